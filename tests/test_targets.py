"""Export targets and their runners on a tiny seeded pipeline (and the demo-size denoiser).

Each target's export is run once per module (fixtures) and its file is run back through the
runtime_py runner where this host can run it, against the PyTorch module's own output.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from runtime_py.runners import (
    RUNTIMES,
    RuntimeUnavailable,
    load_runner,
    runtime_unavailable,
    runtime_version,
)
from calibration.precision import LayerPrecision
from targets import TARGETS, ComponentArtifact, get_target
from targets.tensorrt import BUILD_SCRIPT, ENGINES_FILE, write_build_script
from toolkit.checkpoint import Pipeline, PipelineConfig
from toolkit.components import COMPONENTS, component_specs
from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE
from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet

MIN_SQNR_DB = 60.0  # fp32 export vs PyTorch
MAX_ABS_DIFF = 1e-4  # fp32, outputs of order 1
MIN_SQNR_FP16_DB = 40.0
REPO = Path(__file__).resolve().parents[1]


def make_pipeline(preset: str) -> Pipeline:
    torch.manual_seed(0)
    return Pipeline(config=PipelineConfig(name=preset),
                    denoiser=SoftAlignUNet(SOFTALIGN_PRESETS[preset]).eval(),
                    vae=OobleckVAE(OOBLECK_PRESETS[preset]).eval())


def feeds(spec) -> dict[str, np.ndarray]:
    return {n: t.numpy() for n, t in zip(spec.input_names, spec.example_inputs)}


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - test) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


def assert_parity(spec, outputs: dict[str, np.ndarray], reference: np.ndarray, *,
                  min_sqnr: float = MIN_SQNR_DB, max_abs: float | None = MAX_ABS_DIFF) -> None:
    assert list(outputs) == list(spec.output_names)
    out = outputs[spec.output_names[0]]
    assert out.dtype == np.float32 and out.shape == reference.shape
    snr = sqnr_db(reference, out)
    assert snr > min_sqnr, f"{spec.name}: SQNR {snr:.1f} dB <= {min_sqnr} dB"
    if max_abs is not None:
        assert np.abs(out - reference).max() < max_abs


@pytest.fixture(scope="module")
def specs():
    return component_specs(make_pipeline("tiny"))


@pytest.fixture(scope="module")
def references(specs):
    with torch.no_grad():
        return {name: spec.module(*spec.example_inputs).numpy() for name, spec in specs.items()}


def export_all(target: str, specs, out_dir: Path, precision: str = "fp32") -> dict:
    module = get_target(target)
    return {name: module.export(spec, precision=precision, plan=None, calib=None, out_dir=out_dir)
            for name, spec in specs.items()}


@pytest.fixture(scope="module")
def executorch_bundle(specs, tmp_path_factory):
    out = tmp_path_factory.mktemp("executorch")
    return out, export_all("executorch", specs, out)


@pytest.fixture(scope="module")
def onnx_bundle(specs, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    return out, export_all("onnx", specs, out)


@pytest.fixture(scope="module")
def tensorrt_bundle(specs, tmp_path_factory):
    out = tmp_path_factory.mktemp("tensorrt")
    artifacts = export_all("tensorrt", specs, out, precision="fp16")
    script = write_build_script(out, list(artifacts.values()))
    return out, artifacts, script


@pytest.fixture(scope="module")
def coreml_bundle(specs, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml")
    return out, export_all("coreml", specs, out)


# ---------------------------------------------------------------------------------------------
# The table and the shared surface
# ---------------------------------------------------------------------------------------------


def test_table_lists_every_target_with_the_same_surface():
    assert set(TARGETS) == {"executorch", "onnx", "tensorrt", "coreml"} == set(RUNTIMES)
    for name in TARGETS:
        module = get_target(name)
        assert module.NAME == name
        assert module.FILE_SUFFIX.startswith(".")
        assert callable(module.export)
        assert module.available() is None, f"{name}: {module.available()}"
    reason = get_target("tensorrt").engine_available()
    assert isinstance(reason, str) and reason  # no GPU on the development machines


def test_unknown_target_names_the_choices():
    with pytest.raises(ValueError, match="coreml, executorch, onnx, tensorrt"):
        get_target("tflite")
    with pytest.raises(ValueError, match="unknown target"):
        load_runner("tflite", Path("x"))
    with pytest.raises(ValueError, match="unknown target"):
        runtime_unavailable("tflite")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_bad_plans_and_calibration_are_refused(target, specs, tmp_path):
    module = get_target(target)
    spec = specs["vae_decoder"]
    with pytest.raises(TypeError, match="LayerPrecision"):
        module.export(spec, precision="fp32", plan={"default": "int8"}, calib=None,
                      out_dir=tmp_path)
    with pytest.raises(ValueError, match="without a plan"):
        module.export(spec, precision="fp32", plan=None, calib=[spec.example_inputs], out_dir=tmp_path)
    with pytest.raises(KeyError, match="does not have"):
        module.export(spec, precision="fp32", plan={"no.such.layer": LayerPrecision("int8", "int8")},
                      calib=[spec.example_inputs], out_dir=tmp_path)
    w8a8 = {"decoder.layers.0": LayerPrecision("int8", "int8")}
    with pytest.raises(ValueError, match="calibration data"):
        module.export(spec, precision="fp32", plan=w8a8, calib=None, out_dir=tmp_path)
    with pytest.raises(ValueError, match="precision"):
        module.export(spec, precision="int8", plan=None, calib=None, out_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_runtime_availability_on_this_host():
    assert runtime_unavailable("onnx") is None
    assert runtime_unavailable("executorch") is None
    if sys.platform != "darwin":
        assert runtime_unavailable("coreml") == "Core ML prediction needs macOS"
    assert runtime_version("onnx").startswith("onnxruntime ")
    assert runtime_version("executorch").startswith("executorch ")
    assert isinstance(runtime_unavailable("tensorrt"), (str, type(None)))


def test_runners_module_does_not_import_torch(onnx_bundle):
    out, artifacts = onnx_bundle
    code = (
        "import sys, numpy as np\n"
        "from runtime_py.runners import load_runner\n"
        f"r = load_runner('onnx', {str(out / artifacts['vae_decoder'].path)!r}, threads=1)\n"
        "r.run({'latent': np.zeros((1, 4, 16), np.float32)})\n"
        "assert r.threads == 1\n"
        "assert 'torch' not in sys.modules and 'toolkit' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# ---------------------------------------------------------------------------------------------
# ExecuTorch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("component", COMPONENTS)
def test_executorch_delegation_is_recorded(component, executorch_bundle):
    out, artifacts = executorch_bundle
    art = artifacts[component]
    assert isinstance(art, ComponentArtifact) and art.component == component
    assert art.path == f"{component}.pte" and (out / art.path).is_file()
    assert art.precision == "fp32"
    json.dumps(dataclasses.asdict(art))
    d = art.details["delegation"]
    assert d["backend"] == "XnnpackBackend" and d["delegates"] >= 1
    assert d["ops_total"] == d["ops_delegated"] + d["ops_non_delegated"]
    assert sum(d["non_delegated_ops"].values()) == d["ops_non_delegated"]
    assert sum(d["delegated_ops"].values()) == d["ops_delegated"]
    assert d["coverage"] == pytest.approx(d["ops_delegated"] / d["ops_total"])
    assert d["fully_delegated"] == (d["ops_non_delegated"] == 0)
    if component == "vae_decoder":  # folded weight norm and Snake: one delegate (NOTES.md)
        assert d["fully_delegated"] and d["delegates"] == 1


@pytest.mark.parametrize("component", COMPONENTS)
def test_executorch_runner_matches_torch(component, executorch_bundle, specs, references):
    out, artifacts = executorch_bundle
    spec = specs[component]
    runner = load_runner("executorch", out / artifacts[component].path)
    assert runner.input_names == list(spec.input_names)
    assert runner.output_names == list(spec.output_names)
    assert_parity(spec, runner.run(feeds(spec)), references[component])


def test_executorch_fp16_keeps_float32_io(specs, references, tmp_path):
    spec = specs["vae_decoder"]
    art = get_target("executorch").export(spec, precision="fp16", plan=None, calib=None,
                                          out_dir=tmp_path)
    assert art.precision == "fp16" and art.details["io_dtype"] == "float32"
    runner = load_runner("executorch", tmp_path / art.path)
    assert runner.input_specs["latent"][1] == np.float32
    assert_parity(spec, runner.run(feeds(spec)), references["vae_decoder"],
                  min_sqnr=MIN_SQNR_FP16_DB, max_abs=None)


def test_runner_checks_inputs(executorch_bundle, specs):
    out, artifacts = executorch_bundle
    runner = load_runner("executorch", out / artifacts["vae_decoder"].path)
    good = feeds(specs["vae_decoder"])
    with pytest.raises(ValueError, match="float32"):
        runner.run({"latent": good["latent"].astype(np.float64)})
    with pytest.raises(ValueError, match="missing"):
        runner.run({})
    with pytest.raises(ValueError, match="unexpected"):
        runner.run({**good, "extra": good["latent"]})


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("component", COMPONENTS)
def test_onnx_export_and_runner_parity(component, onnx_bundle, specs, references):
    out, artifacts = onnx_bundle
    art, spec = artifacts[component], specs[component]
    assert art.path == f"{component}.onnx" and (out / art.path).is_file()
    assert art.details["opset"] in (21, 18) and art.details["external_data"] is None
    assert art.details["node_count"] == sum(art.details["op_types"].values())
    assert list(art.details["io"]["inputs"]) == list(spec.input_names)
    runner = load_runner("onnx", out / art.path, threads=1)
    assert runner.input_names == list(spec.input_names) and runner.threads == 1
    assert_parity(spec, runner.run(feeds(spec)), references[component])


def test_onnx_fp16_keeps_float32_io(specs, references, tmp_path):
    spec = specs["vae_decoder"]
    art = get_target("onnx").export(spec, precision="fp16", plan=None, calib=None, out_dir=tmp_path)
    assert art.precision == "fp16" and art.details["fp16_converter"]
    assert art.details["io"]["inputs"]["latent"]["dtype"] == "float32"
    runner = load_runner("onnx", tmp_path / art.path)
    assert_parity(spec, runner.run(feeds(spec)), references["vae_decoder"],
                  min_sqnr=MIN_SQNR_FP16_DB, max_abs=None)


# ---------------------------------------------------------------------------------------------
# TensorRT (ONNX prepared for TensorRT; no engine without a GPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("component", COMPONENTS)
def test_tensorrt_onnx_is_prepared_and_matches_torch(component, tensorrt_bundle, specs,
                                                     references):
    out, artifacts, _ = tensorrt_bundle
    art, spec = artifacts[component], specs[component]
    assert art.path == f"{component}.onnx" and (out / art.path).is_file()
    assert art.precision == "fp16" and art.details["onnx_precision"] == "fp32"
    if get_target("tensorrt").engine_available() is not None:
        engine = art.details["engine"]
        assert engine.startswith("not built (") and engine.endswith(")")
        assert not (out / f"{component}.plan").exists()
    model = onnx.load(out / art.path)
    assert model.opset_import[0].version == 18
    ops = {node.op_type for node in model.graph.node}
    assert "GroupNormalization" not in ops
    initializers = {i.name: i for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert convs and art.details["conv1d_as_conv2d"] == len(convs)
    assert all(len(initializers[n.input[1]].dims) == 4 for n in convs)  # (k x 1) kernels
    runner = load_runner("onnx", out / art.path)
    assert_parity(spec, runner.run(feeds(spec)), references[component])


def test_tensorrt_build_script(tensorrt_bundle, tmp_path):
    out, artifacts, script = tensorrt_bundle
    assert script == out / BUILD_SCRIPT and script.is_file()
    entries = {e["component"]: e for e in json.loads((out / ENGINES_FILE).read_text())}
    for art in artifacts.values():
        assert entries[art.component]["onnx"] == art.path and entries[art.component]["plan"] == art.details["plan"]
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                               text=True, check=True, timeout=60).stdout
    assert "--fp16" in help_text and "--only" in help_text
    # The bundle writer's hook takes the manifest's component entries.
    extras = tmp_path / "bundle"
    entries = {name: {"path": art.path, "precision": art.precision, "details": art.details}
               for name, art in artifacts.items()}
    assert get_target("tensorrt").write_extras(extras, entries).read_text() == script.read_text()
    assert json.loads((extras / ENGINES_FILE).read_text()) == json.loads((out / ENGINES_FILE).read_text())


def test_tensorrt_runner_is_unavailable_without_gpu(tmp_path):
    reason = runtime_unavailable("tensorrt")
    if reason is None:
        pytest.skip("this host can run TensorRT engines")
    with pytest.raises(RuntimeUnavailable, match="tensorrt"):
        load_runner("tensorrt", tmp_path / "denoiser.plan")


# ---------------------------------------------------------------------------------------------
# Core ML (converts and saves on Linux; predicts on macOS only)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("component", COMPONENTS)
def test_coreml_saves_mlpackage(component, coreml_bundle, specs, references):
    out, artifacts = coreml_bundle
    art = artifacts[component]
    assert art.path == f"{component}.mlpackage"
    assert (out / art.path).is_dir() and (out / art.path / "Manifest.json").is_file()
    assert art.details["deployment_target"].startswith("iOS18")
    assert art.details["compute_precision"] == "float32" and art.details["op_count"] > 0
    json.dumps(dataclasses.asdict(art))
    if runtime_unavailable("coreml") is None:
        spec = specs[component]
        runner = load_runner("coreml", out / art.path)
        assert_parity(spec, runner.run(feeds(spec)), references[component], max_abs=1e-3)
    else:
        with pytest.raises(RuntimeUnavailable, match="macOS"):
            load_runner("coreml", out / art.path)


def test_coreml_fp16_keeps_the_timestep_path_float32(specs, tmp_path):
    art = get_target("coreml").export(specs["denoiser"], precision="fp16", plan=None, calib=None,
                                      out_dir=tmp_path)
    assert art.details["compute_precision"] == "float16" and art.details["io_dtype"] == "float32"
    assert art.details["fp16_kept_float32_ops"] > 0
    assert (tmp_path / art.path / "Manifest.json").is_file()


# ---------------------------------------------------------------------------------------------
# Demo size
# ---------------------------------------------------------------------------------------------


def test_demo_denoiser_exports_to_executorch_and_coreml(tmp_path):
    spec = component_specs(make_pipeline("demo"))["denoiser"]
    pte = get_target("executorch").export(spec, precision="fp32", plan=None, calib=None,
                                          out_dir=tmp_path)
    mlpackage = get_target("coreml").export(spec, precision="fp32", plan=None, calib=None,
                                            out_dir=tmp_path)
    assert (tmp_path / pte.path).is_file()
    assert (tmp_path / mlpackage.path / "Manifest.json").is_file()
    d = pte.details["delegation"]
    assert d["ops_total"] == d["ops_delegated"] + d["ops_non_delegated"] and d["delegates"] >= 1
