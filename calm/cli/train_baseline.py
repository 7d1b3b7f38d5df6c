"""Train the token-level Transformer baseline: the same backbone and data as CALM, one
token per step, cross-entropy loss — for fair comparisons at equal budgets.

Example: calm train-baseline --data data/shakespeare --out runs/baseline --preset demo
"""

from __future__ import annotations

import argparse

from calm.cli.common import run_settings
from calm.cli.train import add_model_arguments, job_of
from calm.errors import stop_if_stopped
from calm.runs import train_language_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, "baseline")


def run(args) -> int:
    return stop_if_stopped(train_language_model(job_of(args, "baseline"), run_settings(args)))
