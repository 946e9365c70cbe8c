"""A fifth target, defined in one place, for tests/test_structure.py: ONNX files under another name.

Importing this module (``$ADM_EDGE_TARGET_PLUGINS=tests.dummy_target``) registers the target on
both sides: the toolkit's table where the toolkit is installed, runtime_py's table always.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from runtime_py.runners import RUNTIMES, OnnxRunner, TargetRuntime, _onnx_unavailable

NAME = "dummy"
FILE_SUFFIX = ".donnx"


class DummyRunner(OnnxRunner):
    target = NAME


RUNTIME = TargetRuntime(NAME, DummyRunner, FILE_SUFFIX, "onnxruntime", _onnx_unavailable)


def available() -> str | None:
    from targets import onnx

    return onnx.available()


def export(spec, *, precision, plan, calib, out_dir):
    from targets import onnx

    artifact = onnx.export(spec, precision=precision, plan=plan, calib=calib, out_dir=out_dir)
    path = Path(out_dir) / artifact.path
    renamed = path.with_suffix(FILE_SUFFIX)
    os.replace(path, renamed)
    return dataclasses.replace(artifact, path=renamed.name, details={**artifact.details, "dummy": True})


try:
    from targets import Target, register_target
except ImportError:  # a device: runtime_py only
    RUNTIMES[NAME] = RUNTIME
else:
    register_target(Target(NAME, __name__, FILE_SUFFIX, "onnxruntime"), RUNTIME)
