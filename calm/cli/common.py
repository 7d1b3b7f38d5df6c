"""Flags shared by the commands: config fields become flags, with their docstrings as help."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Any

from calm import config as config_module
from calm.config import TrainConfig


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstrings under each field of a config dataclass (read from source)."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body  # type: ignore[attr-defined]
    for a, b in zip(body, body[1:]):
        if (
            isinstance(a, ast.AnnAssign)
            and isinstance(a.target, ast.Name)
            and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant)
            and isinstance(b.value.value, str)
        ):
            docs[a.target.id] = b.value.value.strip()
    return docs


def _flag_type(tp: Any):
    origin = typing.get_origin(tp)
    if origin is not None:  # Optional[X] → X
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    return tp


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: list[str] | None = None,
    skip: tuple[str, ...] = (),
    prefix: str = "",
    defaults_from: Any = None,
    default_label: str = "default",
) -> None:
    """One ``--field-name`` flag per field; default None means "keep the preset's value"."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in skip:
            continue
        tp = _flag_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        default_note = ""
        if defaults_from is not None:
            default_note = f" ({default_label}: {getattr(defaults_from, f.name)})"
        helptext = docs.get(f.name, "") + default_note
        if tp is bool:
            parser.add_argument(
                flag, dest=prefix.replace("-", "_") + f.name,
                action=argparse.BooleanOptionalAction, default=None, help=helptext,
            )
        else:
            parser.add_argument(
                flag, dest=prefix.replace("-", "_") + f.name, type=tp, default=None,
                metavar=f.name.upper() if tp is not str else "NAME", help=helptext,
            )


def overrides(args: argparse.Namespace, cls: type, *, prefix: str = "", skip=()) -> dict[str, Any]:
    """The config fields the user set on the command line."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        v = getattr(args, prefix.replace("-", "_") + f.name, None)
        if v is not None:
            out[f.name] = v
    return out


def add_train_flags(parser: argparse.ArgumentParser, kind: str) -> None:
    """Training flags; their defaults come from the recipe of the chosen --preset."""
    from calm.recipes import recipe

    g = parser.add_argument_group(
        "training (defaults: the recipe of the chosen --preset, see calm.recipes; shown for demo)"
    )
    add_config_flags(g, TrainConfig, defaults_from=recipe(kind, "demo").train,
                     default_label="demo default")


def train_config(args: argparse.Namespace, defaults: TrainConfig) -> TrainConfig:
    """The recipe's TrainConfig with the flags the user set, checked."""
    from calm.runs import checked_train_config

    return checked_train_config(dataclasses.replace(defaults, **overrides(args, TrainConfig)))


def run_settings(args: argparse.Namespace):
    """The `calm.runs.RunSettings` of a training command's output, runtime and fault flags."""
    from calm.runs import RunSettings

    return RunSettings(
        out=args.out, overwrite=args.overwrite, resume=args.resume,
        keep_checkpoints=args.keep_checkpoints, max_bad_steps=args.max_bad_steps,
        max_minutes=args.max_minutes, dist=args.dist, device=args.device, threads=args.threads,
        precision=args.precision, progress=not args.no_progress,
    )


def add_runtime_flags(parser: argparse.ArgumentParser, *, training: bool = False) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    g.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], default=None,
        help="matrix precision: bf16 autocast over fp32 weights, or fp32; auto (default, or "
             "$CALM_PRECISION) picks bf16 on CUDA and on CPUs with fast bf16 matrix "
             "instructions (AMX, AVX-512-BF16), fp32 elsewhere",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    if training:
        g.add_argument("--max-minutes", type=float, default=None,
                       help="stop training after this many minutes (the final eval and save still run)")


def precision_of(args: argparse.Namespace, device) -> str:
    """The resolved precision ('fp32' or 'bf16') of a command's --precision on ``device``."""
    from calm.precision import default_precision, resolve_precision

    return resolve_precision(getattr(args, "precision", None) or default_precision(), device)


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="run folder to create")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a run folder that already holds a checkpoint"
    )


def add_resume_flags(parser: argparse.ArgumentParser) -> None:
    """Distribution, checkpoints and faults (calm.dist, calm.train)."""
    g = parser.add_argument_group("distribution, checkpoints and faults")
    g.add_argument("--dist", choices=["none", "ddp", "fsdp"], default=None,
                   help="under torchrun: ddp (default when several processes run), fsdp or none")
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue from a checkpoint or run folder; auto: the latest valid "
                        "checkpoint in --out (start afresh when there is none)")
    g.add_argument("--keep-checkpoints", type=int, default=0, metavar="K",
                   help="keep only the newest K checkpoints (0: all)")
    g.add_argument("--max-bad-steps", type=int, default=10, metavar="N",
                   help="stop after N steps in a row with a non-finite loss or gradient (0: never)")


def presets_of(family: str) -> list[str]:
    return list(config_module.PRESETS[family])
