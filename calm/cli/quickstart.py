"""Run the whole CALM pipeline on the demo corpus (Shakespeare), within a time budget.

Stages: prepare the data and tokenizer → train the autoencoder → evaluate it →
train CALM (K = 4) → train the token-level baseline at a comparable budget →
evaluate both → generate samples → write a report. Every stage writes into the
run folder; rerunning reuses the stages already finished (--fresh redoes them).

Example: calm quickstart --out runs/quickstart --minutes 13
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from calm.errors import CalmError, Stopped

# Share of the training budget per stage; evaluation and sampling take the rest.
# (Giving the autoencoder 15 % instead, which benchmarks/autoencoder_budget.py says costs
# CALM nothing, left CALM and the baseline where they were; see the README.)
SPLIT = {"ae": 0.32, "calm": 0.38, "baseline": 0.30}
TRAIN_SHARE = 0.8  # of --minutes; the remainder goes to data, evaluation, samples


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="run folder")
    p.add_argument("--minutes", type=float, default=13.0,
                   help="total time budget in minutes (about 80 %% of it trains the three models)")
    p.add_argument("--data", type=Path, default=None,
                   help="use this prepared dataset instead of the demo corpus")
    p.add_argument("--fresh", action="store_true", help="redo every stage, even finished ones")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                   help="matrix precision of every stage (default: auto, see `calm train --help`)")


def _stage(name: str) -> None:
    print(f"\n=== {name} ===", flush=True)


def _done(folder: Path) -> bool:
    return (folder / "DONE").is_file()


def _mark(folder: Path, info: dict) -> None:
    (folder / "DONE").write_text(json.dumps(info) + "\n")


def _call(argv: list[str]) -> None:
    from calm.cli import main

    rc = main(argv)
    stopped = {code: name for name, code in Stopped.CODES.items()}
    if rc in stopped:
        # Not marked finished: a rerun redoes this stage and keeps the ones before it.
        raise Stopped(f"stopped by {stopped[rc]} in stage `calm {argv[0]}`; rerun the same "
                      "command to redo it (the finished stages are kept)", stopped[rc])
    if rc != 0:
        raise CalmError(f"stage `calm {' '.join(argv[:1])}` failed (exit {rc})")


def _capture(argv: list[str]) -> str:
    """Run a command, return what it printed (for --json outputs)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        _call(argv)
    return buf.getvalue()


def run(args) -> int:
    out: Path = args.out
    if args.minutes <= 0:
        raise CalmError(f"--minutes must be positive, got {args.minutes}")
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    train_minutes = args.minutes * TRAIN_SHARE
    common = ["--device", args.device, "--threads", str(args.threads)]
    if args.precision:
        common += ["--precision", args.precision]
    summary: dict = {"minutes": args.minutes}

    _stage("1/6 data")
    data = args.data or out / "data"
    if args.data is None and not (data / "meta.json").is_file():
        _call(["prepare", "--demo", "--out", str(data)])
    elif args.data is not None and not (data / "meta.json").is_file():
        raise CalmError(f"--data {data} is not a prepared dataset (no meta.json)")
    else:
        print(f"reusing {data}")

    ae = out / "autoencoder"
    _stage("2/6 autoencoder")
    if not _done(ae):
        # A large step cap: the time budget decides when each stage ends.
        _call(["train-ae", "--data", str(data), "--out", str(ae), "--preset", "demo", "--steps", "100000",
               "--max-minutes", f"{train_minutes * SPLIT['ae']:.3f}", "--overwrite", *common])
        _mark(ae, {})
    else:
        print(f"reusing {ae}")
    ae_eval = json.loads(_capture(["eval-ae", "--model", str(ae), "--data", str(data), "--json",
                                   *common[:2], *common[4:]]))
    (out / "autoencoder_eval.json").write_text(json.dumps(ae_eval, indent=2) + "\n")
    summary["autoencoder"] = ae_eval
    print(f"autoencoder: accuracy {100 * ae_eval['acc_sample']:.2f} % decoding a sampled z, "
          f"sigma {ae_eval['sigma']:.3f}, {ae_eval['collapsed_dims']} collapsed dims")

    for kind, cmd, extra in (
        ("calm", "train", ["--autoencoder", str(ae)]),
        ("baseline", "train-baseline", []),
    ):
        folder = out / kind
        _stage(f"{3 if kind == 'calm' else 4}/6 {kind}")
        if not _done(folder):
            _call([cmd, "--data", str(data), "--out", str(folder), "--preset", "demo", *extra,
                   "--steps", "100000",
                   "--max-minutes", f"{train_minutes * SPLIT[kind]:.3f}", "--overwrite",
                   "--eval-every", "100", "--eval-brier", "--eval-brier-tokens", "4096", *common])
            _mark(folder, {})
        else:
            print(f"reusing {folder}")

    _stage("5/6 evaluation")
    try:
        from calm.evaluate import REPORT_SAMPLES

        have_eval = True
    except ImportError:
        have_eval = False
        print("BrierLM evaluation is not available in this version; skipped")
    for kind in ("calm", "baseline"):
        if have_eval:
            # The baseline's Brier-n use exact probabilities; CALM's use samples.
            samples = ["--samples", str(REPORT_SAMPLES)] if kind == "calm" else []
            res = json.loads(_capture(["eval", "--model", str(out / kind), "--data", str(data),
                                       "--max-tokens", "16384", "--json", *samples,
                                       *common[:2], *common[4:]]))
            (out / kind / "eval.json").write_text(json.dumps(res, indent=2) + "\n")
            summary[kind] = res

    _stage("6/6 samples")
    samples = []
    for kind in ("calm", "baseline"):
        for temp in (1.0, 0.5):
            lines = _capture(["generate", "--model", str(out / kind), "--prompt", "ROMEO:",
                              "--prompt", "To be, or not", "--max-new-tokens", "48",
                              "--temperature", str(temp), "--seed", "0", "--json", *common[:2], *common[4:]])
            for line in lines.splitlines():
                rec = json.loads(line)
                samples.append({"model": kind, "temperature": temp, **rec})
    (out / "samples.json").write_text(json.dumps(samples, indent=2) + "\n")
    summary["samples"] = samples
    summary["wall_minutes"] = (time.perf_counter() - t_start) / 60
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    report = out / "report.md"
    from calm.report import write_report

    write_report(out)
    print(f"\nfinished in {summary['wall_minutes']:.1f} min; report: {report}", file=sys.stderr)
    return 0
