"""Load any checkpoint folder back into its model (weights via safetensors only)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calm.checkpoint import load_weights_into, read_config, read_weights, resolve_checkpoint
from calm.config import AutoencoderConfig, CALMConfig, TransformerConfig, from_dict
from calm.errors import CalmError

KINDS = ("autoencoder", "calm", "baseline")


def checkpoint_kind(path: str | Path) -> tuple[Path, dict[str, Any]]:
    ckpt = resolve_checkpoint(path)
    cfg = read_config(ckpt)
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise CalmError(f"{ckpt}/config.json: unknown model kind {kind!r} (expected one of {KINDS})")
    return ckpt, cfg


def autoencoder_fields(data: dict) -> dict:
    """An autoencoder config's JSON fields, with the defaults of checkpoints written before
    a field existed (they masked dropped tokens with id 0)."""
    return {"token_mask": "id0", **data} if isinstance(data, dict) else data


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu"):
    from calm.autoencoder import Autoencoder

    ckpt, cfg = checkpoint_kind(path)
    if cfg["kind"] != "autoencoder":
        raise CalmError(f"{ckpt} holds a {cfg['kind']} model, not an autoencoder")
    model_cfg = from_dict(AutoencoderConfig, autoencoder_fields(cfg.get("model", {})),
                          where=f"{ckpt}/config.json model")
    model = Autoencoder(model_cfg)
    load_weights_into(model, read_weights(ckpt), str(ckpt))
    return model.to(device).eval(), ckpt, cfg


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def autoencoder_record(ckpt: Path, ae_cfg: dict) -> dict:
    """What a CALM checkpoint remembers of its autoencoder, to find and verify it later."""
    return {
        "path": str(Path(ckpt).resolve()),
        "sha256": file_sha256(Path(ckpt) / "model.safetensors"),
        "model": ae_cfg.get("model"),
        "tokenizer": (ae_cfg.get("data") or {}).get("tokenizer"),
    }


def load_calm(path, device="cpu", autoencoder_path=None):
    """A CALM checkpoint and the autoencoder it records (or ``autoencoder_path``), verified."""
    from calm.model import CALM

    ckpt, cfg = checkpoint_kind(path)
    if cfg["kind"] != "calm":
        raise CalmError(f"{ckpt} holds a {cfg['kind']} model, not a CALM model")
    model_cfg = from_dict(CALMConfig, cfg.get("model", {}), where=f"{ckpt}/config.json model")
    rec = cfg.get("autoencoder") or {}
    ae_path = autoencoder_path or rec.get("path")
    sibling = Path(ckpt).parent / "autoencoder"  # a moved `calm import` folder keeps its pair
    if not autoencoder_path and (not ae_path or not Path(ae_path).exists()) and sibling.is_dir():
        ae_path = sibling
    if not ae_path or not Path(ae_path).exists():
        raise CalmError(
            f"the autoencoder of {ckpt} was not found at {ae_path!r}; pass --autoencoder DIR"
        )
    ae, ae_ckpt, _ = load_autoencoder(ae_path, device)
    if rec.get("sha256") and file_sha256(Path(ae_ckpt) / "model.safetensors") != rec["sha256"]:
        raise CalmError(
            f"the autoencoder at {ae_ckpt} is not the one {ckpt} was trained with (weights differ)"
        )
    model = CALM(model_cfg, ae)
    weights = read_weights(ckpt)
    weights.update({f"autoencoder.{k}": v for k, v in ae.state_dict().items()})
    load_weights_into(model, weights, str(ckpt))
    return model.to(device).eval(), ckpt, cfg


def load_baseline(path, device="cpu"):
    from calm.baseline import TokenLM

    ckpt, cfg = checkpoint_kind(path)
    if cfg["kind"] != "baseline":
        raise CalmError(f"{ckpt} holds a {cfg['kind']} model, not a baseline")
    model_cfg = from_dict(TransformerConfig, cfg.get("model", {}), where=f"{ckpt}/config.json model")
    model = TokenLM(model_cfg)
    load_weights_into(model, read_weights(ckpt), str(ckpt))
    return model.to(device).eval(), ckpt, cfg


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Path, dict]:
    """Any checkpoint → (model in eval mode, checkpoint folder, its config.json)."""
    ckpt, cfg = checkpoint_kind(path)
    if cfg["kind"] == "autoencoder":
        return load_autoencoder(ckpt, device)
    if cfg["kind"] == "calm":
        return load_calm(ckpt, device)
    return load_baseline(ckpt, device)


def load_checkpoint_tokenizer(ckpt: Path):
    from calm.tokenizer import load_tokenizer

    tok_dir = Path(ckpt) / "tokenizer"
    if not tok_dir.is_dir():
        raise CalmError(f"{ckpt} has no tokenizer/ folder")
    return load_tokenizer(tok_dir)


def document_start_id(ckpt_cfg: dict, tokenizer) -> int:
    """The token put before a prompt that starts a document: the one the model's training
    documents started after. This library's models: end of text (documents are joined
    with it); imported authors' models: their begin-of-text token."""
    start = ckpt_cfg.get("document_start")
    return int(start) if isinstance(start, int) and not isinstance(start, bool) else tokenizer.eot_id


def check_same_tokenizer(ckpt_cfg: dict, dataset, ckpt: Path) -> None:
    """Refuse a dataset whose tokenizer is not the one the model was trained with."""
    want = (ckpt_cfg.get("data") or {}).get("tokenizer")
    have = dataset.fingerprint
    vocab = (ckpt_cfg.get("model") or {}).get("vocab_size") or (
        (ckpt_cfg.get("model") or {}).get("backbone") or {}
    ).get("vocab_size")
    if want is not None and want != have:
        raise CalmError(
            f"the dataset's tokenizer ({have[:12]}) differs from the one {ckpt} was trained with "
            f"({want[:12]}); prepare the data with the model's tokenizer"
        )
    if vocab is not None and dataset.vocab_size > vocab:
        raise CalmError(
            f"the dataset's vocabulary ({dataset.vocab_size}) is larger than the model's ({vocab})"
        )
