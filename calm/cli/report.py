"""Rebuild a quickstart run folder's report (report.md and its PNG plots).

Example: calm report runs/quickstart
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="the run folder (as written by `calm quickstart`)")


def run(args) -> int:
    from calm.report import write_report

    path = write_report(args.run)
    print(path)
    return 0
