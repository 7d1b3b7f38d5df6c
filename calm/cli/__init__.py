"""The command line: ``calm <command> ...`` (also ``python -m calm``).

Each command lives in its own module of this package with two functions:
``add_arguments(parser)`` and ``run(args) -> int``. Commands only assemble
library pieces; the work happens in the library modules.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from calm.errors import CalmError, Stopped

# command name -> (module, one-line help). Order is the order of `calm --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("quickstart", "run the whole pipeline on the demo corpus"),
    "prepare": ("prepare", "tokenize a corpus into a dataset folder"),
    "train-ae": ("train_ae", "train the chunk autoencoder"),
    "eval-ae": ("eval_ae", "evaluate an autoencoder: accuracy, sigma, collapse, robustness"),
    "train": ("train", "train a CALM model on top of a frozen autoencoder"),
    "train-baseline": ("train_baseline", "train the token-level Transformer baseline"),
    "generate": ("generate", "generate text from a CALM or baseline checkpoint"),
    "eval": ("evaluate", "BrierLM (and perplexity for baselines) on held-out data"),
    "flops": ("flops", "training and inference FLOPs of a model"),
    "compare": ("compare", "a Table-1-style comparison of trained runs"),
    "tradeoff": ("tradeoff", "accuracy-diversity trade-off of temperature sampling"),
    "report": ("report", "rebuild a run folder's report"),
    "import": ("import_authors", "import a checkpoint in the CALM authors' format"),
    "serve": ("serve", "serve a model over HTTP with an OpenAI-compatible API"),
}


def _available() -> dict[str, tuple[str, str]]:
    """Commands whose module exists (the package grows command by command)."""
    out = {}
    for name, (mod, helptext) in COMMANDS.items():
        if importlib.util.find_spec(f"calm.cli.{mod}") is not None:
            out[name] = (mod, helptext)
    return out


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks (examples); appends a flag's default when it
    has a meaningful one and its help does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" not in text
            and action.default not in (None, False, argparse.SUPPRESS)
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calm",
        description="Continuous Autoregressive Language Models: train, evaluate and sample.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, helptext) in _available().items():
        module = importlib.import_module(f"calm.cli.{mod}")
        p = sub.add_parser(
            name,
            help=helptext,
            description=(module.__doc__ or helptext).strip(),
            formatter_class=HelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from calm import __version__

        print(__version__)
        return 0
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from calm.runtime import configure_cpu_memory

    configure_cpu_memory()  # before the command's first large tensor
    try:
        return int(args._run(args) or 0)
    except Stopped as e:
        if str(e):
            print(f"calm {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except CalmError as e:
        print(f"calm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"calm {args.command}: interrupted", file=sys.stderr)
        return 130
