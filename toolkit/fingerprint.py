"""Content fingerprints: what a resumable job (sensitivity, distillation) checks before it resumes.

A job identifies its inputs by resolved path *and* content, so a path typed differently resumes,
and the same path holding other files (a re-made calibration set, another checkpoint) does not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def module_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's tensors (names, dtypes, shapes, bytes): identifies a teacher or a VAE."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tree_digest(root: Path) -> str:
    """sha256 over every file under ``root`` (relative path and bytes), hidden files excepted."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(rel.as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()
