"""Checkpoints: atomic step directories of safetensors and JSON (no pickle anywhere).

A run folder looks like::

    RUN/
      metrics.jsonl                  one JSON object per logged step
      checkpoints/step_000500/       one complete checkpoint per saved step
        model.safetensors            weights
        config.json                  format version, model kind, model and train configs
        state.json                   step, data position, anything small
        optimizer.safetensors        AdamW moments (+ optimizer.json for hyper-parameters)
        rng.safetensors              RNG states, for an exact resume
        tokenizer/                   the tokenizer the model was trained with

A checkpoint is first written to a hidden temporary folder beside its final
name and renamed into place, so a crash never leaves a half-written one.

Resuming (``resume_checkpoint``) takes the newest step directory that passes
``validate_checkpoint``: every file present, JSON parsable, safetensors headers
covering their files exactly; a damaged one is skipped with a message, never
loaded. Nothing is ever unpickled: weights, optimizer moments and RNG states are
safetensors, the rest JSON (configs validated by ``calm.config.from_dict``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from calm.errors import CalmError

FORMAT_VERSION = 1
STEP_RE = re.compile(r"^step_(\d{6,})$")


class NewerFormat(CalmError):
    """A checkpoint written by a newer version of calm."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete step directories of a run folder, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and (p / "config.json").is_file() and (p / "model.safetensors").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def has_checkpoint(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / "config.json").is_file() or bool(list_checkpoints(run_dir))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the latest checkpoint of a run folder."""
    path = Path(path)
    if not path.exists():
        raise CalmError(f"model path {path} does not exist")
    if (path / "config.json").is_file():
        return path
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise CalmError(f"{path} holds no checkpoint (expected config.json or checkpoints/step_*)")
    return ckpts[-1]


def _json_dump_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict (integer parameter ids) into flat tensors
    (for safetensors, named ``"{id}.{name}"``) and the JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of ``split_optimizer_state``: a state dict for ``Optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    try:
        for key, value in tensors.items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
        for idx, extra in meta.get("scalars", {}).items():
            state.setdefault(int(idx), {}).update(extra)
        groups = meta["param_groups"]
    except (ValueError, KeyError, AttributeError, TypeError):
        raise CalmError("optimizer state is malformed") from None
    return {"state": state, "param_groups": groups}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state into flat tensors (safetensors) and JSON-able rest."""
    return split_optimizer_state(optimizer.state_dict())


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    optimizer.load_state_dict(join_optimizer_state(tensors, meta))


_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file one tensor at a time.

    ``safetensors.torch.save_file`` first turns every tensor into a bytes object, so
    saving holds a second copy of all the weights; this writes the same format (a
    little-endian header length, the JSON header, the raw data in header order)
    straight from each tensor's memory.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    order = sorted(tensors)  # as safetensors orders them
    for k in order:
        v = tensors[k]
        if v.dtype not in _ST_DTYPES:
            raise CalmError(f"cannot save tensor {k} of dtype {v.dtype} as safetensors")
        n = v.numel() * v.element_size()
        header[k] = {"dtype": _ST_DTYPES[v.dtype], "shape": list(v.shape),
                     "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k in order:
            v = tensors[k].detach().cpu().contiguous()
            if v.numel():
                f.write(memoryview(v.reshape(-1).view(torch.uint8).numpy()))


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished folder ``tmp`` to ``target``. An older ``target`` is moved
    aside first and removed only once the new one is in place, so one complete version
    is on disk at every moment."""
    if target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}-{os.urandom(4).hex()}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def save_checkpoint(
    target: str | Path,
    *,
    model_state: dict[str, torch.Tensor],
    config: dict[str, Any],
    state: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | dict | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    tokenizer=None,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write a complete checkpoint folder at ``target`` atomically; return its path.

    ``optimizer``: an optimizer, or its state dict (integer parameter ids), as
    gathered from sharded training.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    except OSError as e:
        raise CalmError(f"cannot write checkpoint {target}: {e.strerror or e}") from None
    try:
        # Tied weights need no copy: every name is written from memory on its own.
        write_safetensors(model_state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(
            json.dumps({"format_version": FORMAT_VERSION, **config}, indent=2) + "\n"
        )
        (tmp / "state.json").write_text(json.dumps(state or {}, indent=2) + "\n")
        if optimizer is not None:
            sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
            tensors, meta = split_optimizer_state(sd)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(meta) + "\n")
        if rng:
            save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        for name, src in (extra_files or {}).items():
            shutil.copy2(src, tmp / name)
        swap_into_place(tmp, target)  # replaces an older copy (same step, e.g. --overwrite)
    except OSError as e:
        # A full or read-only disk: nothing half-written stays behind, the previous
        # checkpoints are untouched, and the user gets one line instead of a traceback.
        shutil.rmtree(tmp, ignore_errors=True)
        raise CalmError(f"cannot write checkpoint {target}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_config(ckpt: str | Path) -> dict[str, Any]:
    ckpt = Path(ckpt)
    path = ckpt / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise CalmError(f"{ckpt} is not a checkpoint: config.json is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalmError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CalmError(f"{path} must hold a JSON object")
    version = cfg.get("format_version")
    if not isinstance(version, int):
        raise CalmError(f"{path} has no integer format_version")
    if version > FORMAT_VERSION:
        raise NewerFormat(
            f"{ckpt} has checkpoint format {version}, newer than this calm understands "
            f"({FORMAT_VERSION}); upgrade calm"
        )
    return cfg


def read_weights(ckpt: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(ckpt) / "model.safetensors"
    if not path.is_file():
        raise CalmError(f"{ckpt} is not a checkpoint: model.safetensors is missing")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CalmError(f"{path} is corrupt or truncated: {e}") from None


def read_state(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / "state.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CalmError(f"{path} is not valid JSON: {e}") from None


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CalmError(f"{path} is corrupt or truncated: {e}") from None


def load_weights_into(
    module: torch.nn.Module, weights: dict[str, torch.Tensor], where: str, *, assign: bool = False
) -> None:
    """Strict load with a one-line error naming the first mismatch. ``assign``: the module's
    parameters become the given tensors (no copy; for a module built on the meta device)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CalmError(f"{where}: weights do not match the config ({what})")
    for k, v in weights.items():
        if own[k].shape != v.shape:
            raise CalmError(
                f"{where}: weight {k} has shape {tuple(v.shape)}, the config needs {tuple(own[k].shape)}"
            )
    module.load_state_dict(weights, assign=assign)


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` step directories (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- resume


class CorruptCheckpoint(CalmError):
    """A checkpoint folder that is incomplete or damaged (never loaded)."""


TRAINING_FILES = ("model.safetensors", "config.json", "state.json", "optimizer.safetensors",
                  "optimizer.json", "rng.safetensors")


def _check_safetensors(path: Path) -> None:
    # Opening checks the header and that the tensors cover the file exactly (a
    # truncated or padded file fails) without reading the tensors themselves.
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptCheckpoint(f"{path} is corrupt or truncated: {e}") from None


def _check_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(f"{path} is not valid JSON: {e}") from None


def validate_checkpoint(ckpt: str | Path) -> dict[str, Any]:
    """Check that a step directory holds everything a resume needs, undamaged.

    Returns its config.json. Raises ``CorruptCheckpoint`` for a missing, truncated
    or unparsable file, and a plain ``CalmError`` for a checkpoint written by a
    newer calm (which must not be skipped silently in favour of an older one).
    """
    ckpt = Path(ckpt)
    missing = [f for f in TRAINING_FILES if not (ckpt / f).is_file()]
    if missing:
        raise CorruptCheckpoint(f"{ckpt} is incomplete: {', '.join(missing)} missing")
    _check_json(ckpt / "config.json")
    try:
        cfg = read_config(ckpt)
    except NewerFormat:
        raise
    except CalmError as e:
        raise CorruptCheckpoint(str(e)) from None
    state = _check_json(ckpt / "state.json")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CorruptCheckpoint(f"{ckpt}/state.json has no integer step")
    meta = _check_json(ckpt / "optimizer.json")
    if not isinstance(meta, dict) or "param_groups" not in meta:
        raise CorruptCheckpoint(f"{ckpt}/optimizer.json has no param_groups")
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        _check_safetensors(ckpt / name)
    return cfg


def clean_partial_checkpoints(run_dir: str | Path) -> None:
    """Remove the temporary folders of saves that a crash interrupted."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (p.name.startswith(".tmp-") or p.name.startswith(".old-")):
                shutil.rmtree(p, ignore_errors=True)


def latest_valid_checkpoint(run_dir: str | Path, report=print) -> Path | None:
    """The newest step directory of a run folder that passes ``validate_checkpoint``;
    damaged ones are skipped, each with a message through ``report``."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    candidates = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            candidates.append((int(m.group(1)), p))
    for _, p in sorted(candidates, reverse=True):
        try:
            validate_checkpoint(p)
            return p
        except CorruptCheckpoint as e:
            report(f"skipping checkpoint {p.name}: {e}")
    return None


def resume_checkpoint(spec: str | Path, run_dir: str | Path, report=print) -> Path | None:
    """Resolve ``--resume``: ``auto`` → the latest valid checkpoint of ``run_dir`` (None
    when there is none yet); a run folder → its latest valid checkpoint; a step
    directory → itself, which must be valid."""
    if str(spec) == "auto":
        return latest_valid_checkpoint(run_dir, report)
    path = Path(spec)
    if not path.exists():
        raise CalmError(f"--resume {path}: no such checkpoint or run folder")
    if (path / "config.json").is_file() and (path / "state.json").is_file():
        validate_checkpoint(path)
        return path
    found = latest_valid_checkpoint(path, report)
    if found is None:
        raise CalmError(f"--resume {path}: no valid checkpoint found there")
    return found


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
            if d:
                return d
        return None
    if a != b:
        return f"{where or 'value'} is {a!r} in the checkpoint, {b!r} now"
    return None


def check_resumable(saved: dict[str, Any], current: dict[str, Any], ckpt: Path) -> None:
    """Refuse to resume a checkpoint into a different model, autoencoder or dataset."""
    if saved.get("kind") != current.get("kind"):
        raise CalmError(
            f"cannot resume {ckpt}: it holds a {saved.get('kind')} model, this run trains a "
            f"{current.get('kind')} model"
        )
    old_data, new_data = saved.get("data") or {}, current.get("data") or {}
    if old_data.get("tokenizer") != new_data.get("tokenizer"):
        raise CalmError(
            f"cannot resume {ckpt} on a different dataset: its tokenizer differs "
            f"({str(old_data.get('tokenizer'))[:12]} vs {str(new_data.get('tokenizer'))[:12]})"
        )
    old_path, new_path = old_data.get("path"), new_data.get("path")
    if old_path and new_path and Path(old_path).resolve() != Path(new_path).resolve():
        raise CalmError(
            f"cannot resume {ckpt} on a different dataset: it was trained on {old_path}, "
            f"this run reads {new_path}"
        )
    d = _first_difference(saved.get("model"), current.get("model"))
    if d:
        raise CalmError(f"cannot resume {ckpt} with a different model config: {d}")
    old_ae, new_ae = saved.get("autoencoder") or {}, current.get("autoencoder") or {}
    if old_ae.get("sha256") != new_ae.get("sha256"):
        raise CalmError(f"cannot resume {ckpt}: it was trained on top of a different autoencoder")
