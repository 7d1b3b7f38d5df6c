"""Checkpoints in the CALM authors' format: read them, turn them into this library's own.

The authors released their autoencoder and CALM-M/L/XL as Hugging Face folders
(``cccczshao/CALM-Autoencoder``, ``cccczshao/CALM-M``, …). ``import_checkpoint``
turns such a folder (or a Hub id, with the optional ``huggingface_hub``) into
two ordinary checkpoint folders of this library::

    OUT/autoencoder/   model.safetensors, config.json, state.json, tokenizer/
    OUT/calm/          the same for CALM; its config records OUT/autoencoder

What their format looks like, and what this module does with it:

* weights in ``model.safetensors`` or ``pytorch_model.bin`` (or a sharded
  ``*.index.json`` of either). A pickle is read only with
  ``torch.load(weights_only=True, mmap=True)``: tensors, nothing executable.
* the model kind is in ``architectures`` (``Autoencoder``, ``EnergyTransformer``);
  there is no ``model_type``. Flow and diffusion CALMs are refused for now.
* names that share one tensor: the energy head under ``mlp_generator.`` and
  ``generative_head.``, the autoencoder embedding as ``encoder.embed_tokens.weight``
  and ``decoder.lm_head_weight``. A file may hold either name or both; where it
  holds both they must be equal. A safetensors file may list dropped names in its
  metadata as ``dropped -> kept``.
* a CALM file carries its whole autoencoder as ``ae_model.*``; the configuration's
  ``ae_path`` names a folder on the authors' training machine and is ignored. An
  ``--autoencoder`` given beside it must hold the same weights.
* their autoencoder has biases on its squeeze, latent, un-latent and expand layers
  (``AutoencoderConfig.projection_bias``) and runs 2·⌊n/2⌋ of its n layers per
  stack: an odd last layer, never used, is dropped.
* prompts whose length is not a multiple of K: the authors right-pad them with
  ``[PAD]`` ids. An imported model reads the prompt as it is, with the absent
  leading slots of its first chunk filled by the backbone's ``[PAD]`` embedding
  (``CALM.pad_embed``), as every model of this library does. Prompts whose length
  is a multiple of K are read exactly as the authors' code reads them. A prompt
  that starts a document gets their ``<|begin_of_text|>`` in front (the config's
  ``document_start``), as their training documents had.
* the tokenizer (``tokenizer.json``, Llama 3 plus ``[PAD]`` for the released
  models) is kept as is; its end of text is ``<|end_of_text|>``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from calm.config import AutoencoderConfig, CALMConfig, HeadConfig, TransformerConfig, to_dict
from calm.errors import CalmError

ARCHITECTURES = {"Autoencoder": "autoencoder", "EnergyTransformer": "calm"}
UNSUPPORTED = {"FlowTransformer": "flow", "DiffusionTransformer": "diffusion"}
NUM_TARGETS = 100  # fixed in the authors' code, not in their configuration
HEAD_PREFIXES = ("mlp_generator.", "generative_head.")
AE_EMBED = ("encoder.embed_tokens.weight", "decoder.lm_head_weight")


@dataclass
class AuthorsCheckpoint:
    """One folder in the authors' format, read: its kind, configuration and tensors."""

    folder: Path
    kind: str  # "autoencoder" or "calm"
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- reading


def resolve_source(src: str | Path) -> Path:
    """A local folder, or a Hub id (``owner/name``) downloaded with ``huggingface_hub``."""
    p = Path(src).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CalmError(f"{src} is a file; give the checkpoint's folder")
    text = str(src)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CalmError(f"{src}: no such folder (a Hub id looks like owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CalmError(
            f"{src} is not a local folder, and Hub downloads need the optional extra "
            "(pip install 'calm[hub]'); or download the folder yourself and pass its path"
        ) from None
    try:
        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as e:  # network, missing repository, permissions
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CalmError(
            f"cannot download {src} from the Hub ({first}); download the folder yourself "
            "and pass its local path"
        ) from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CalmError(f"{path.parent} has no {path.name}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalmError(f"{path} is not valid JSON: {e}") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CalmError(f"{path} is corrupt or truncated: {e}") from None
    # Names dropped because they shared a tensor: the metadata maps each to the kept one.
    for dropped, kept in meta.items():
        if dropped != "format" and kept in tensors and dropped not in tensors:
            tensors[dropped] = tensors[kept]
    return tensors


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError (not plain tensors), truncation, zip errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CalmError(f"{path}: cannot read it as plain tensors ({first[:200]})") from None
    if not isinstance(sd, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise CalmError(f"{path} does not hold a flat mapping of names to tensors")
    return sd


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's weight file(s): safetensors first, else the pickle."""
    for single, reader in (("model.safetensors", _read_safetensors), ("pytorch_model.bin", _read_pickle)):
        if (folder / single).is_file():
            return reader(folder / single)
        index = folder / f"{single}.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CalmError(f"{index} has no weight_map")
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard or not (folder / shard).is_file():
                    raise CalmError(f"{index} names a shard {shard!r} that is not in {folder}")
                tensors.update(reader(folder / shard))
            missing = sorted(set(weight_map) - set(tensors))
            if missing:
                raise CalmError(f"{index}: {missing[0]} is in none of its shards")
            return tensors
    raise CalmError(f"{folder} has no model.safetensors or pytorch_model.bin")


def read_folder(src: str | Path) -> AuthorsCheckpoint:
    folder = resolve_source(src)
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise CalmError(f"{folder}/config.json must hold a JSON object")
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 else None
    if arch in UNSUPPORTED:
        raise CalmError(
            f"{folder}: {arch} (a CALM with the {UNSUPPORTED[arch]} head) cannot be imported yet; "
            "only EnergyTransformer and Autoencoder can"
        )
    if arch not in ARCHITECTURES:
        raise CalmError(
            f"{folder}/config.json: unknown architecture {archs!r}; expected one of "
            f"{', '.join(ARCHITECTURES)}"
        )
    return AuthorsCheckpoint(folder, ARCHITECTURES[arch], config, read_tensors(folder))


# ----------------------------------------------------------------------------- configs


def _get(cfg: dict, key: str, kind: type, where: str, default: Any = ...) -> Any:
    if key not in cfg:
        if default is ...:
            raise CalmError(f"{where}: {key} is missing")
        return default
    v = cfg[key]
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v, ok = float(v), True
    if not ok:
        raise CalmError(f"{where}: {key} must be {kind.__name__}, got {v!r}")
    return v


def _require(cfg: dict, key: str, allowed: tuple, where: str) -> None:
    if cfg.get(key, allowed[0]) not in allowed:
        raise CalmError(f"{where}: {key}={cfg[key]!r} is not supported (only {allowed[0]!r})")


def autoencoder_config(cfg: dict, where: str) -> AutoencoderConfig:
    _require(cfg, "hidden_act", ("silu",), where)
    _require(cfg, "mlp_bias", (False,), where)
    ne = _get(cfg, "num_encoder_layers", int, where)
    nd = _get(cfg, "num_decoder_layers", int, where)
    try:
        return AutoencoderConfig(
            vocab_size=_get(cfg, "vocab_size", int, where),
            chunk_size=_get(cfg, "patch_size", int, where),
            hidden_size=_get(cfg, "hidden_size", int, where),
            intermediate_size=_get(cfg, "intermediate_size", int, where),
            # Their stacks run 2·⌊n/2⌋ layers: an odd last one is never used.
            num_encoder_layers=2 * (ne // 2),
            num_decoder_layers=2 * (nd // 2),
            latent_size=_get(cfg, "latent_size", int, where),
            rms_norm_eps=_get(cfg, "rms_norm_eps", float, where, 1e-6),
            kl_weight=_get(cfg, "kl_weight", float, where, 1e-3),
            kl_clip=_get(cfg, "kl_clamp", float, where, 0.5),
            dropout=_get(cfg, "ae_dropout", float, where, 0.15),
            token_mask="id0",
            projection_bias=True,
        )
    except (TypeError, ValueError) as e:
        raise CalmError(f"{where}: {e}") from None


def calm_config(cfg: dict, ae: AutoencoderConfig, where: str) -> CALMConfig:
    _require(cfg, "hidden_act", ("silu",), where)
    _require(cfg, "mlp_bias", (False,), where)
    _require(cfg, "attention_bias", (False,), where)
    _require(cfg, "rope_scaling", (None,), where)
    _require(cfg, "pretraining_tp", (1,), where)
    d = _get(cfg, "hidden_size", int, where)
    heads = _get(cfg, "num_attention_heads", int, where)
    backbone = TransformerConfig(
        vocab_size=_get(cfg, "vocab_size", int, where),
        hidden_size=d,
        intermediate_size=_get(cfg, "intermediate_size", int, where),
        num_layers=_get(cfg, "num_hidden_layers", int, where),
        num_heads=heads,
        num_kv_heads=_get(cfg, "num_key_value_heads", int, where, heads),
        max_seq_len=_get(cfg, "max_position_embeddings", int, where, 2048),
        rope_theta=_get(cfg, "rope_theta", float, where, 10000.0),
        rms_norm_eps=_get(cfg, "rms_norm_eps", float, where, 1e-6),
    )
    head = HeadConfig(
        kind="energy",
        noise_size=_get(cfg, "noise_size", int, where),
        width=d,
        num_blocks=_get(cfg, "num_mlp_layers", int, where),
        num_samples=_get(cfg, "num_samples", int, where, 8),
        num_targets=NUM_TARGETS,
        alpha=_get(cfg, "beta", float, where, 1.0),
    )
    K, latent = _get(cfg, "patch_size", int, where), _get(cfg, "latent_size", int, where)
    if (K, latent) != (ae.chunk_size, ae.latent_size):
        raise CalmError(
            f"{where}: K={K}, latent {latent}, but its autoencoder has K={ae.chunk_size}, "
            f"latent {ae.latent_size}"
        )
    return CALMConfig(backbone=backbone, head=head, chunk_size=K, latent_size=latent)


# ----------------------------------------------------------------------------- weights


def _take_aliases(t: dict[str, torch.Tensor], names: tuple[str, ...], where: str) -> torch.Tensor | None:
    """The one tensor stored under any of ``names`` (all present ones must be equal)."""
    found = [(n, t.pop(n)) for n in names if n in t]
    if not found:
        return None
    n0, v0 = found[0]
    for n, v in found[1:]:
        if v.shape != v0.shape or not torch.equal(v, v0):
            raise CalmError(f"{where}: {n0} and {n} should be one tensor but differ (tampered file?)")
    return v0


def _rename(t: dict[str, torch.Tensor], table: list[tuple[str, str]], out: dict, where: str) -> None:
    for theirs, ours in table:
        if theirs not in t:
            raise CalmError(f"{where}: tensor {theirs} is missing")
        out[ours] = t.pop(theirs)


def _mlp(t: dict, theirs: str, ours: str, out: dict, where: str) -> None:
    """Their gated MLP (gate_proj, up_proj, down_proj) → ours (gate_up = [gate; up], down)."""
    for part in ("gate_proj", "up_proj", "down_proj"):
        if f"{theirs}.{part}.weight" not in t:
            raise CalmError(f"{where}: tensor {theirs}.{part}.weight is missing")
    out[f"{ours}.gate_up.weight"] = torch.cat(
        [t.pop(f"{theirs}.gate_proj.weight"), t.pop(f"{theirs}.up_proj.weight")]
    )
    out[f"{ours}.down.weight"] = t.pop(f"{theirs}.down_proj.weight")


def autoencoder_weights(
    tensors: dict[str, torch.Tensor], cfg: AutoencoderConfig, config: dict, where: str, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Their autoencoder tensors (names under ``prefix``) → this library's state dict."""
    t = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    embed = _take_aliases(t, AE_EMBED, where)
    if embed is None:
        raise CalmError(f"{where}: the autoencoder's embedding ({prefix}{AE_EMBED[0]}) is missing")
    out["embed.weight"] = embed
    for stack, n_stored, pre, post in (
        ("encoder.encoder_layers", config.get("num_encoder_layers"), "enc_pre", "enc_post"),
        ("decoder.decoder_layers", config.get("num_decoder_layers"), "dec_pre", "dec_post"),
    ):
        half = n_stored // 2
        for i in range(2 * half):
            ours = f"{pre}.{i}" if i < half else f"{post}.{i - half}"
            _rename(t, [(f"{stack}.{i}.layernorm.weight", f"{ours}.norm.weight")], out, where)
            _mlp(t, f"{stack}.{i}.mlp", f"{ours}.mlp", out, where)
        if n_stored % 2:  # never run by their code
            for k in [k for k in t if k.startswith(f"{stack}.{2 * half}.")]:
                del t[k]
    table = [
        ("encoder.squeeze_layer.weight", "squeeze.weight"), ("encoder.squeeze_layer.bias", "squeeze.bias"),
        ("encoder.norm.weight", "enc_norm.weight"),
        ("encoder.hidden_to_latent.weight", "to_latent.weight"),
        ("encoder.hidden_to_latent.bias", "to_latent.bias"),
        ("decoder.latent_to_hidden.weight", "from_latent.weight"),
        ("decoder.latent_to_hidden.bias", "from_latent.bias"),
        ("decoder.expand_layer.weight", "expand.weight"), ("decoder.expand_layer.bias", "expand.bias"),
        ("decoder.norm.weight", "dec_norm.weight"),
    ]
    _rename(t, table, out, where)
    if t:
        raise CalmError(f"{where}: unexpected tensor {prefix}{sorted(t)[0]}")
    return out


def calm_weights(
    tensors: dict[str, torch.Tensor], cfg: CALMConfig, config: dict, where: str
) -> dict[str, torch.Tensor]:
    """Their CALM tensors (``ae_model.*`` excluded) → this library's CALM state dict."""
    t = {k: v for k, v in tensors.items() if not k.startswith("ae_model.")}
    # The head under either prefix (or both, equal): gather it once, under the first.
    head: dict[str, torch.Tensor] = {}
    suffixes = {k.split(".", 1)[1] for k in t if k.startswith(HEAD_PREFIXES)}
    for s in sorted(suffixes):
        v = _take_aliases(t, tuple(p + s for p in HEAD_PREFIXES), where)
        head[s] = v
    out: dict[str, torch.Tensor] = {}
    embed = t.get("transformer.embed_tokens.weight")
    _rename(t, [("transformer.embed_tokens.weight", "embed.weight")], out, where)
    # Absent prompt slots read the backbone's [PAD] embedding (see the module docstring).
    pad = config.get("pad_token_id")
    if isinstance(pad, int) and 0 <= pad < embed.shape[0]:
        out["pad_embed"] = embed[pad].clone()
    else:
        out["pad_embed"] = torch.zeros(embed.shape[1], dtype=embed.dtype)
    for i in range(cfg.backbone.num_layers):
        a, b = f"transformer.layers.{i}", f"backbone.blocks.{i}"
        for part in ("q_proj", "k_proj", "v_proj"):
            if f"{a}.self_attn.{part}.weight" not in t:
                raise CalmError(f"{where}: tensor {a}.self_attn.{part}.weight is missing")
        out[f"{b}.attn.qkv.weight"] = torch.cat(
            [t.pop(f"{a}.self_attn.{p}.weight") for p in ("q_proj", "k_proj", "v_proj")]
        )
        _rename(t, [
            (f"{a}.self_attn.o_proj.weight", f"{b}.attn.proj.weight"),
            (f"{a}.input_layernorm.weight", f"{b}.attn_norm.weight"),
            (f"{a}.post_attention_layernorm.weight", f"{b}.mlp_norm.weight"),
        ], out, where)
        _mlp(t, f"{a}.mlp", f"{b}.mlp", out, where)
    table = [("transformer.norm.weight", "backbone.norm.weight")]
    for i in (0, 2, 3):
        table += [(f"embed_proj.{i}.weight", f"compress.{i}.weight"), (f"embed_proj.{i}.bias", f"compress.{i}.bias")]
    _rename(t, table, out, where)
    if t:
        raise CalmError(f"{where}: unexpected tensor {sorted(t)[0]}")
    lin = lambda a, b: [(f"{a}.weight", f"head.{b}.weight"), (f"{a}.bias", f"head.{b}.bias")]  # noqa: E731
    htable = lin("noise_embd", "noise_proj") + lin("norm_noise", "noise_norm")
    htable += lin("hidden_embd", "cond_proj") + lin("norm_hidden", "cond_norm")
    for j in range(cfg.head.num_blocks):
        m = f"mlp_blocks.{j}"
        htable += lin(f"{m}.in_ln", f"blocks.{j}.norm") + lin(f"{m}.linears.0", f"blocks.{j}.fuse")
        htable += lin(f"{m}.linears.2", f"blocks.{j}.mid") + lin(f"{m}.linears.4", f"blocks.{j}.gate_up")
        htable += lin(f"{m}.down_proj", f"blocks.{j}.out")
    htable += lin("final_layer.in_ln", "final_norm") + lin("final_layer.linears.0", "final_hidden")
    htable += lin("final_layer.linears.2", "final_out")
    _rename(head, htable, out, where + " (energy head)")
    if head:
        raise CalmError(f"{where}: unexpected tensor {HEAD_PREFIXES[0]}{sorted(head)[0]}")
    return out


# ----------------------------------------------------------------------------- models


def build_autoencoder(ck: AuthorsCheckpoint, prefix: str = "", config: dict | None = None):
    """(Autoencoder in eval mode, its config) from an authors' autoencoder or a CALM's ae_model.*."""
    from calm.autoencoder import Autoencoder
    from calm.checkpoint import load_weights_into

    config = ck.config if config is None else config
    where = str(ck.folder)
    cfg = autoencoder_config(config, f"{where}/config.json")
    with torch.device("meta"):  # no memory for weights that are about to be replaced
        model = Autoencoder(cfg)
    weights = autoencoder_weights(ck.tensors, cfg, config, where, prefix)
    load_weights_into(model, {k: v.float() for k, v in weights.items()}, where, assign=True)
    return model.eval(), cfg


def _embedded_ae_config(ck: AuthorsCheckpoint, ae_ck: AuthorsCheckpoint | None) -> dict:
    """The autoencoder configuration of a CALM file: from --autoencoder, else inferred."""
    if ae_ck is not None:
        return ae_ck.config
    t, c = ck.tensors, ck.config
    where = f"{ck.folder}"

    def count(stack: str) -> int:
        ids = {int(k.split(".")[3]) for k in t if k.startswith(f"ae_model.{stack}.")}
        return max(ids) + 1 if ids else 0

    embed = t.get("ae_model.encoder.embed_tokens.weight", t.get("ae_model.decoder.lm_head_weight"))
    gate = t.get("ae_model.encoder.encoder_layers.0.mlp.gate_proj.weight")
    if embed is None or gate is None:
        raise CalmError(f"{where}: the CALM file holds no autoencoder (ae_model.*); pass --autoencoder")
    return {
        "vocab_size": embed.shape[0], "hidden_size": embed.shape[1],
        "intermediate_size": gate.shape[0], "patch_size": c.get("patch_size"),
        "latent_size": c.get("latent_size"), "rms_norm_eps": c.get("rms_norm_eps", 1e-6),
        "num_encoder_layers": count("encoder.encoder_layers"),
        "num_decoder_layers": count("decoder.decoder_layers"),
    }


def build_calm(ck: AuthorsCheckpoint, ae_ck: AuthorsCheckpoint | None = None):
    """(CALM in eval mode, its autoencoder) from an authors' EnergyTransformer folder.

    The autoencoder comes from the CALM file's ``ae_model.*``; ``ae_ck`` (their
    autoencoder folder), if given, supplies its configuration and must hold the
    same weights.
    """
    from calm.checkpoint import load_weights_into
    from calm.model import CALM

    where = str(ck.folder)
    ae_config = _embedded_ae_config(ck, ae_ck)
    if any(k.startswith("ae_model.") for k in ck.tensors):
        ae, ae_cfg = build_autoencoder(ck, "ae_model.", ae_config)
        if ae_ck is not None:
            other, _ = build_autoencoder(ae_ck)
            for k, v in other.state_dict().items():
                if not torch.equal(v, ae.state_dict()[k]):
                    raise CalmError(
                        f"the autoencoder at {ae_ck.folder} is not the one inside {where} "
                        f"(weights differ, first at {k})"
                    )
    elif ae_ck is not None:
        ae, ae_cfg = build_autoencoder(ae_ck)
    else:
        raise CalmError(f"{where}: the CALM file holds no autoencoder (ae_model.*); pass --autoencoder")
    cfg = calm_config(ck.config, ae_cfg, f"{where}/config.json")
    with torch.device("meta"):
        model = CALM(cfg, ae)
    weights = calm_weights(ck.tensors, cfg, ck.config, where)
    weights.update({f"autoencoder.{k}": v for k, v in ae.state_dict().items()})
    load_weights_into(model, {k: v.float() for k, v in weights.items()}, where, assign=True)
    return model.eval(), ae


def _tokenizer(folder: Path, config: dict):
    """Their tokenizer.json, with end of text = their eos token, and the vocabulary check."""
    from calm.tokenizer import Tokenizer, from_tokenizer_json

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CalmError(f"{folder} has no tokenizer.json")
    tok = from_tokenizer_json(path)
    eos = config.get("eos_token_id")
    if isinstance(eos, int):
        name = tok._backend.id_to_token(eos)
        if name is None:
            raise CalmError(f"{folder}: eos_token_id {eos} is not in tokenizer.json")
        if name != tok.eot_token:
            tok = Tokenizer("hf", tok._backend, eot_token=name, source=str(path))
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and tok.vocab_size > vocab:
        raise CalmError(f"{folder}: tokenizer.json has {tok.vocab_size} ids, the model {vocab}")
    return tok


def import_checkpoint(
    src: str | Path, out: str | Path, *, autoencoder: str | Path | None = None, overwrite: bool = False
) -> dict[str, Path]:
    """Convert an authors' folder (autoencoder or CALM) into this library's checkpoints.

    Returns {"autoencoder": OUT/autoencoder, "calm": OUT/calm} (no "calm" for an
    autoencoder). Everything is built and checked in memory first, then written to
    a temporary folder beside OUT and renamed into place: a failure leaves nothing.
    """
    from calm.checkpoint import save_checkpoint, swap_into_place
    from calm.loading import autoencoder_record

    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise CalmError(f"{out} already exists; choose another --out or pass --overwrite")
    ck = read_folder(src)
    ae_ck = read_folder(autoencoder) if autoencoder is not None else None
    if ae_ck is not None and ae_ck.kind != "autoencoder":
        raise CalmError(f"{ae_ck.folder} holds a CALM model, not an autoencoder")
    if ck.kind == "autoencoder":
        if ae_ck is not None:
            raise CalmError("--autoencoder is only for importing a CALM model")
        ae, ae_cfg = build_autoencoder(ck)
        model = None
    else:
        model, ae = build_calm(ck, ae_ck)
        ae_cfg = ae.config
    tok = _tokenizer(ck.folder, ck.config)
    source = {"format": "calm-authors", "source": str(src), "architectures": ck.config.get("architectures")}
    # Their documents start after <|begin_of_text|>: generation puts it before a prompt.
    bos = ck.config.get("bos_token_id")
    start = {"document_start": bos} if isinstance(bos, int) and 0 <= bos < tok.vocab_size else {}
    data = {"path": None, "tokenizer": tok.fingerprint}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        ae_dir = save_checkpoint(
            tmp / "autoencoder", model_state=ae.state_dict(), tokenizer=tok,
            config={"kind": "autoencoder", "model": to_dict(ae_cfg), "data": data, "imported": source},
        )
        paths = {"autoencoder": out / "autoencoder"}
        if model is not None:
            final_ae = (out / "autoencoder").resolve()
            rec = autoencoder_record(ae_dir, {"model": to_dict(ae_cfg), "data": data})
            rec["path"] = str(final_ae)
            save_checkpoint(
                tmp / "calm", model_state=model.checkpoint_state(), tokenizer=tok,
                config={"kind": "calm", "model": to_dict(model.config), "data": data,
                        "autoencoder": rec, "imported": source, **start},
            )
            paths["calm"] = out / "calm"
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return paths
