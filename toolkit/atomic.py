"""Atomic outputs: write into a temporary sibling, rename into place when complete.

A crash or a kill midway leaves the previous output (or nothing) under the final name, never a
half-written directory that looks whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask_mode(path: Path) -> Path:
    """tempfile makes 0700 directories; the output is for the user's umask like any other folder."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)
    return path


@contextmanager
def atomic_directory(final: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; on success it replaces ``final``."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; choose another output or remove it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _umask_mode(Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent)))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_partials(parent: Path) -> list[Path]:
    """Remove the temporary directories that killed writers left in ``parent`` (hidden
    ``.<name>.partial-*``, made by :func:`atomic_directory` and :func:`staging_directory`)."""
    removed = []
    for stale in sorted(Path(parent).glob(".*.partial-*")):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed


@contextmanager
def staging_directory(parent: Path, *, prefix: str) -> Iterator[Path]:
    """Yield a temporary directory in ``parent`` for an output whose final name is known only at the
    end; the caller moves it into place with :func:`promote`. Removed if the block raises."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = _umask_mode(Path(tempfile.mkdtemp(prefix=f".{prefix}.partial-", dir=parent)))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def promote(tmp: Path, final: Path, *, overwrite: bool) -> Path:
    """Rename the complete directory ``tmp`` to ``final`` (replacing it only when ``overwrite``)."""
    final = Path(final)
    if final.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{final} exists; choose another output or remove it")
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def write_text_atomically(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a hidden sibling renamed into place (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def save_safetensors(tensors: dict, path: Path, *, metadata: dict | None = None) -> Path:
    """``safetensors.torch.save_file``, with the file's mode set by the user's umask: safetensors
    writes through a private temporary file and renames it, which leaves the result 0600."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
    return Path(path)
