"""Compilation targets (executorch, coreml, tensorrt, onnx); one module each, listed in one table.

Every target module has the same small surface (STYLE.md rule 4):

* ``NAME``, ``FILE_SUFFIX``;
* ``available() -> str | None``: None when *export* works on this host, else the reason (only a
  missing SDK, an ``ImportError``, is turned into a reason; everything else raises);
* ``export(spec, *, precision, plan, calib, out_dir) -> ComponentArtifact``: writes
  ``out_dir/<spec.name><FILE_SUFFIX>`` and says what it did in the artifact's ``details``.

The SDKs are imported inside the functions, so importing this package (or a target module) costs
nothing. What *runs* an exported file lives in ``runtime_py.runners``, keyed by the same names.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

TARGETS: dict[str, str] = {
    "executorch": "targets.executorch",
    "onnx": "targets.onnx",
    "tensorrt": "targets.tensorrt",
    "coreml": "targets.coreml",
}

PRECISIONS = ("fp32", "fp16")

PLAN_NOT_IMPLEMENTED = "quantization plans land with the quantization issue"


@dataclass(frozen=True)
class ComponentArtifact:
    """One exported component inside a bundle directory.

    ``path`` is relative to the bundle directory (a file such as ``denoiser.pte`` or a directory
    such as ``denoiser.mlpackage``); ``precision`` is what was actually applied; ``details`` is
    target-specific and JSON-serialisable (delegation coverage, converter settings, engine status).
    """

    component: str
    path: str
    precision: str
    details: dict = field(default_factory=dict)


def get_target(name: str) -> ModuleType:
    """The target module called ``name`` (imports it; its SDK is still imported lazily)."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(sorted(TARGETS))}")
    return importlib.import_module(TARGETS[name])


def check_export_args(target: str, *, precision: str, plan: dict | None,
                      calib: Path | None) -> None:
    """The checks every ``export`` starts with: strict about what it cannot honour yet."""
    if plan is not None or calib is not None:
        raise NotImplementedError(PLAN_NOT_IMPLEMENTED)
    if precision not in PRECISIONS:
        raise ValueError(f"{target}: precision must be one of {PRECISIONS}, got {precision!r}")


def replace_into(out_dir: Path, write, name: str) -> Path:
    """Call ``write(tmp_path)`` for ``out_dir/name`` inside a temporary sibling directory, then move
    the result into place, so a crash never leaves a half-written file that looks whole.

    ``write`` may create extra files next to ``tmp_path`` (ONNX external data); they move too.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
    try:
        write(tmp_dir / name)
        for produced in sorted(tmp_dir.iterdir()):
            final = out_dir / produced.name
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            os.replace(produced, final)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir / name
