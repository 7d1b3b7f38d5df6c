"""Import a checkpoint in the CALM authors' format (their released models).

SRC is a local folder as their code saves it (config.json, pytorch_model.bin or
model.safetensors, tokenizer.json), or a Hugging Face Hub id such as
cccczshao/CALM-M (needs `pip install 'calm[hub]'` and network access; without
them, download the folder yourself and pass its path).

Writes two checkpoint folders of this library, usable by every command:
  OUT/autoencoder   the autoencoder (from the CALM file's own copy of it)
  OUT/calm          the CALM model, which records OUT/autoencoder
(an autoencoder SRC gives OUT/autoencoder only). Nothing is written unless the
whole import succeeds.

Prompts whose length is not a multiple of K: an imported model reads the prompt
as it is, its first chunk's absent leading slots filled with the [PAD]
embedding; the authors' code right-pads with [PAD] ids instead.

Examples:
  calm import ./CALM-M --out runs/calm-m
  calm import cccczshao/CALM-M --autoencoder cccczshao/CALM-Autoencoder --out runs/calm-m
  calm generate --model runs/calm-m/calm --prompt "The river"
"""

from __future__ import annotations

import argparse
import math

from calm.authors_format import import_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="authors' checkpoint folder or Hub id")
    p.add_argument("--out", required=True, help="folder to write (must not exist, or be empty)")
    p.add_argument("--autoencoder", metavar="SRC",
                   help="their autoencoder folder or Hub id: supplies its configuration, and "
                        "must hold the same weights as the CALM file's copy")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def run(args) -> int:
    paths = import_checkpoint(args.src, args.out, autoencoder=args.autoencoder,
                              overwrite=args.overwrite)
    from safetensors import safe_open

    for kind, path in paths.items():
        # The models were built and checked before writing; here only the file's header.
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        print(f"{kind:12s} {path}  ({n / 1e6:.2f}M parameters)")
    return 0

