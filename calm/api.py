"""The Python API: ``calm.load(...)`` → a model that generates, streams and scores text.

    import calm
    m = calm.load("runs/calm")                 # own checkpoint, or an authors' folder, or a Hub id
    m.generate(["The river"], max_new_tokens=32, temperature=0.5, seed=0)   # -> list[str]
    for piece in m.stream("The river", max_new_tokens=32):
        print(piece, end="")
    m.brier(["a held-out document", "another one"])   # Brier-1..4, BrierLM, standard errors

CALM and the token-level baseline answer the same calls. A folder in the CALM
authors' format (or a Hub id such as ``cccczshao/CALM-M``) is imported once into
``$CALM_CACHE`` (default ``~/.cache/calm``) and loaded from there.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from calm.errors import CalmError


def _cache_dir() -> Path:
    return Path(os.environ.get("CALM_CACHE", Path.home() / ".cache" / "calm"))


def _is_own_checkpoint(path: Path) -> bool:
    """A folder this library wrote (a checkpoint, or a run folder holding checkpoints)."""
    cfg = path / "config.json"
    if (path / "checkpoints").is_dir():
        return True
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return True  # let the loader give its error
    return isinstance(data, dict) and "format_version" in data


class LanguageModel:
    """A loaded CALM or baseline with its tokenizer. Build it with ``calm.load``."""

    def __init__(self, model, tokenizer, checkpoint: Path, config: dict, precision: str | None):
        self.model = model
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.config = config
        self.precision = precision

    @property
    def kind(self) -> str:
        """'calm' or 'baseline'."""
        return self.config["kind"]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        return f"LanguageModel(kind={self.kind!r}, checkpoint='{self.checkpoint}')"

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(t) for t in ids if int(t) != self.tokenizer.eot_id])

    # ------------------------------------------------------------------ generation

    def _run(self, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 1.0,
             sampler: str = "batch", num_candidates: int = 200, max_calls: int = 100_000,
             seed: int | None = None, document_start: bool = True, on_step=None,
             compile: bool = False):
        from calm.generate import generate
        from calm.loading import document_start_id

        if isinstance(prompts, str):
            raise CalmError("prompts must be a list of strings (use stream() for one prompt)")
        prompts = list(prompts)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise CalmError("every prompt must be a non-empty string")
        start = document_start_id(self.config, self.tokenizer)
        ids = [([start] if document_start else []) + self.encode(p) for p in prompts]
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        chooser = None
        if self.kind == "calm" and temperature != 1.0:
            from calm.temperature_sampling import temperature_chooser

            if not 0 < temperature <= 1:
                raise CalmError(f"temperature must be in (0, 1], got {temperature}")
            chooser = temperature_chooser(self.model, temperature, sampler=sampler,
                                          num_candidates=num_candidates, max_calls=max_calls,
                                          generator=generator)
        with torch.no_grad():
            return generate(self.model, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                            eot_id=self.tokenizer.eot_id, generator=generator, chooser=chooser,
                            on_step=on_step, precision=self.precision, compile=compile)

    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        sampler: str = "batch",
        num_candidates: int = 200,
        max_calls: int = 100_000,
        seed: int | None = None,
        document_start: bool = True,
        compile: bool = False,
    ) -> list[str]:
        """The continuation of each prompt (without the prompt).

        CALM below temperature 1 samples with ``sampler``: 'batch' (Algorithm 2, T = 1/n,
        ``num_candidates`` head samples per step) or 'exact' (Algorithm 1, any T, at most
        ``max_calls`` draws per step); the baseline scales its softmax. ``document_start``
        puts the token that training documents started after before each prompt (end of
        text; an imported authors' model: its begin-of-text). ``compile``: CALM at
        temperature 1 compiles its head and decoder on the first call (``calm.generate``).
        """
        out = self._run(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        sampler=sampler, num_candidates=num_candidates, max_calls=max_calls,
                        seed=seed, document_start=document_start, compile=compile)
        return [self.decode(t) for t in out.tokens]

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        sampler: str = "batch",
        num_candidates: int = 200,
        max_calls: int = 100_000,
        seed: int | None = None,
        document_start: bool = True,
    ) -> Iterator[str]:
        """The continuation of one prompt in pieces, one per generation step (the options of
        ``generate``). Pieces never split a multi-byte character. Generation runs to its
        end first; the pieces are then yielded in order."""
        from calm.tokenizer import TextStream

        text = TextStream(self.tokenizer)
        pieces: list[str] = []
        self._run([prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                  sampler=sampler, num_candidates=num_candidates, max_calls=max_calls, seed=seed,
                  document_start=document_start, on_step=lambda added: pieces.append(text.push(added[0])))
        pieces.append(text.finish())
        yield from (p for p in pieces if p)

    # ------------------------------------------------------------------ evaluation

    def brier(self, texts: list[str], *, block_size: int = 512, batch_size: int = 8,
              seed: int = 0) -> dict[str, float]:
        """Brier-1..4 (± standard errors) and BrierLM on ``texts``, each a whole document.

        The documents are tokenized, each followed by end of text (as ``calm prepare``
        writes them), joined and cut into blocks of ``block_size`` tokens (the last partial block is dropped); every
        position of every block is scored, as ``calm eval`` does.
        """
        from calm.brier import BrierStats
        from calm.evaluate import brier_for_model
        from calm.precision import autocast, resolve_precision

        if isinstance(texts, str) or not texts:
            raise CalmError("texts must be a non-empty list of strings")
        K = self.model.config.chunk_size if self.kind == "calm" else 1
        block = block_size - block_size % K
        ids: list[int] = []
        for t in texts:
            ids += self.encode(t) + [self.tokenizer.eot_id]
        n_blocks = len(ids) // block
        if n_blocks == 0:
            raise CalmError(f"the texts hold {len(ids)} tokens, fewer than one block of {block}")
        tokens = torch.tensor(ids[: n_blocks * block], device=self.device).view(n_blocks, block)
        g = torch.Generator(device=self.device).manual_seed(seed)
        stats = BrierStats(4)
        precision = resolve_precision(self.precision or "fp32", self.device)
        with torch.no_grad(), autocast(self.device, precision):
            for i in range(0, n_blocks, batch_size):
                brier_for_model(self.model, tokens[i : i + batch_size], generator=g, stats=stats)
        return {"tokens": n_blocks * block, **stats.summary()}


def load(
    source: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    autoencoder: str | os.PathLike | None = None,
    precision: str | None = None,
) -> LanguageModel:
    """A CALM or baseline, ready to generate and score text.

    ``source``: a run or checkpoint folder of this library; a folder in the CALM authors'
    format; or a Hugging Face Hub id of one (needs ``calm[hub]``). Authors' checkpoints are
    imported once into ``$CALM_CACHE/imported``. ``autoencoder``: for an own CALM whose
    autoencoder moved, or an authors' autoencoder to check the CALM file against.
    ``precision``: 'auto', 'fp32' or 'bf16' for generation (scoring uses fp32 unless set).
    """
    from calm.loading import checkpoint_kind, load_checkpoint_tokenizer, load_model
    from calm.runtime import pick_device

    dev = pick_device(str(device) if device is not None else "auto")
    path = Path(source).expanduser()
    if not (path.is_dir() and _is_own_checkpoint(path)):
        from calm.authors_format import import_checkpoint

        key = hashlib.sha256(str(path.resolve() if path.exists() else source).encode()).hexdigest()[:16]
        dest = _cache_dir() / "imported" / key
        if not (dest / "autoencoder" / "config.json").is_file():
            import_checkpoint(source, dest, autoencoder=autoencoder, overwrite=dest.exists())
        path = dest / "calm" if (dest / "calm").is_dir() else dest / "autoencoder"
        autoencoder = None
    ckpt, cfg = checkpoint_kind(path)
    if cfg["kind"] == "autoencoder":
        raise CalmError(f"{ckpt} is an autoencoder; load a CALM or baseline checkpoint")
    if cfg["kind"] == "calm":
        from calm.loading import load_calm

        model, ckpt, cfg = load_calm(ckpt, dev, autoencoder_path=autoencoder)
    else:
        model, ckpt, cfg = load_model(ckpt, dev)
    return LanguageModel(model, load_checkpoint_tokenizer(ckpt), ckpt, cfg, precision)
