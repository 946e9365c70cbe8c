"""Compilation targets (executorch, coreml, tensorrt, onnx); one module each, listed in one table.

Every target module has the same small surface (STYLE.md rule 4):

* ``NAME``, ``FILE_SUFFIX``;
* ``available() -> str | None``: None when *export* works on this host, else the reason (only a
  missing SDK, an ``ImportError``, is turned into a reason; everything else raises);
* ``export(spec, *, precision, plan, calib, out_dir) -> ComponentArtifact``: writes
  ``out_dir/<spec.name><FILE_SUFFIX>`` and says what it did in the artifact's ``details``.

Quantized export. ``plan`` is the component's resolved plan: a dict from the FQN of every
quantizable leaf of ``spec.module`` (Conv1d, ConvTranspose1d, Linear; see
``calibration.plan.component_assignment``) to a ``LayerPrecision``; ``None`` means float.
``calib`` is a list of input tuples in ``spec.example_inputs``' order and shapes (the PTQ4ADM
calibration intermediates prepared by ``toolkit.bundle.calibration_feeds``), required when any
entry asks for integer activations. A quantized artifact's ``details["lowering"]`` is the lowering
report of :func:`lowering_report`: for every layer of the plan, what was requested, what the
target actually applied, and why they differ. A target never drops an entry silently.

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

@dataclass(frozen=True)
class Target:
    """One row of the toolkit's target table.

    ``module``: the export module (the surface in the module doc); ``file_suffix``: what its
    component files end with; ``runtime_distribution``: the package whose version a bundle records
    as the runtime it was exported for. The device side keeps its own row per target in
    ``runtime_py.runners.RUNTIMES`` (runtime_py never imports this package); a test checks that
    the two tables agree, and :func:`register_target` adds a target to both at once.
    """

    name: str
    module: str
    file_suffix: str
    runtime_distribution: str

    def bundle_name(self, model: str, precision: str) -> str:
        """``<model>-<target>[-<applied precision>]``; fp32 is the unsuffixed default."""
        return f"{model}-{self.name}" + ("" if precision == "fp32" else f"-{precision}")


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("executorch", "targets.executorch", ".pte", "executorch"),
    Target("onnx", "targets.onnx", ".onnx", "onnxruntime"),
    Target("tensorrt", "targets.tensorrt", ".onnx", "tensorrt"),
    Target("coreml", "targets.coreml", ".mlpackage", "coremltools"),
)}

# Whole-model float precisions an export takes without a plan (a plan sets each layer instead).
EXPORT_PRECISIONS = ("fp32", "fp16")


def register_target(target: Target, runtime) -> None:
    """Add a target to the toolkit's table and its device-side row (``runtime_py.runners.TargetRuntime``)
    to runtime_py's, in one call: export, verify, the matrix and the CLI then all see it."""
    from runtime_py.runners import RUNTIMES

    if runtime.name != target.name or runtime.file_suffix != target.file_suffix \
            or runtime.distribution != target.runtime_distribution:
        raise ValueError(f"target {target.name!r}: the toolkit row and the runtime row disagree "
                         f"({target} vs {runtime})")
    TARGETS[target.name] = target
    RUNTIMES[runtime.name] = runtime


def unregister_target(name: str) -> None:
    """Undo :func:`register_target` (tests)."""
    from runtime_py.runners import RUNTIMES

    TARGETS.pop(name, None)
    RUNTIMES.pop(name, None)


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


def target_names() -> tuple[str, ...]:
    """Every target, plugins (``$ADM_EDGE_TARGET_PLUGINS``) included, in table order."""
    from runtime_py.runners import load_target_plugins

    load_target_plugins()
    return tuple(TARGETS)


def get_target(name: str) -> ModuleType:
    """The export module of target ``name`` (imports it; its SDK is still imported lazily)."""
    if name not in target_names():
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(sorted(TARGETS))}")
    return importlib.import_module(TARGETS[name].module)


def check_export_args(target: str, *, precision: str, plan: dict | None,
                      calib: list | None, spec=None) -> None:
    """The checks every ``export`` starts with (see the module doc for ``plan`` and ``calib``)."""
    from calibration.precision import LayerPrecision

    if precision not in EXPORT_PRECISIONS:
        raise ValueError(f"{target}: precision must be one of {EXPORT_PRECISIONS}, got {precision!r}")
    if plan is None:
        if calib is not None:
            raise ValueError(f"{target}: calibration data without a plan would be ignored; pass a plan too")
        return
    if not isinstance(plan, dict) or not all(isinstance(v, LayerPrecision) for v in plan.values()):
        raise TypeError(f"{target}: plan must map layer FQNs to LayerPrecision "
                        "(calibration.plan.component_assignment resolves a plan JSON)")
    if spec is not None:
        from toolkit.families import check_quantizable, quantizable_leaves

        check_quantizable(spec.module, source=f"{target} {spec.name}")
        leaves = quantizable_leaves(spec.module)
        unknown = sorted(set(plan) - set(leaves))
        if unknown:
            raise KeyError(f"{target} {spec.name}: the plan names layers the component does not have: "
                           f"{unknown[:5]}")
    needs_calib = [n for n, p in plan.items() if p.activations in ("int8", "int16")]
    if needs_calib and not calib:
        raise ValueError(f"{target}: {len(needs_calib)} layers (e.g. {needs_calib[0]}) ask for integer "
                         "activations, which need calibration data: pass --calib DIR (toolkit calibrate)")


def lowering_report(requested: dict, applied: dict, *, departures: dict | None = None) -> dict:
    """The lowering report of one component (ARCHITECTURE.md): per planned layer, requested vs applied.

    ``requested``: FQN → LayerPrecision (the resolved plan); ``applied``: FQN → (LayerPrecision
    actually applied, reason or None). Every requested layer must be accounted for.
    ``departures``: FQN → reason, for layers whose types match the plan but whose scheme does not
    (int8 activations quantized at run time, not with the calibrated ranges): not honoured either.
    """
    departures = departures or {}
    missing = sorted(set(requested) - set(applied))
    if missing:
        raise RuntimeError(f"lowering report: no record of what was applied to {missing[:5]}; "
                           "a target must report every planned layer")
    layers, differs = {}, []
    for name, want in requested.items():
        got, why = applied[name]
        same = (got.weights, got.activations) == (want.weights, want.activations) and name not in departures
        if not same:
            differs.append(name)
            why = departures.get(name) if why is None else why
        layers[name] = {"requested": want.to_dict(), "applied": got.to_dict(),
                        "honoured": same, "why": None if same else (why or "not given")}
    return {"layers": layers, "honoured": len(requested) - len(differs), "differs": differs}


def plan_label(plan: dict | None) -> str:
    """A short precision label for an artifact: 'fp32' or e.g. 'int8w/int8a x40 + fp16w/fp16a x11'."""
    if not plan:
        return "fp32"
    from collections import Counter

    counts = Counter(f"{p.weights}w/{p.activations}a" for p in plan.values())
    return " + ".join(f"{k} x{v}" for k, v in counts.most_common())


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
