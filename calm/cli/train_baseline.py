"""Train the token-level Transformer baseline: the same backbone and data as CALM, one
token per step, cross-entropy loss — for fair comparisons at equal budgets.

Example: calm train-baseline --data data/shakespeare --out runs/baseline --preset demo
"""

from __future__ import annotations

import argparse

from calm.cli.train import add_model_arguments, run_training


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, "baseline")


def run(args) -> int:
    return run_training(args, kind="baseline")
