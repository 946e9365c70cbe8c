"""The native runner (adm-run, native/): parity with the Python ExecuTorch runner, verification
without torch, and clean refusals of altered or malformed bundles.

Needs the binary: `cmake -S . -B build && cmake --build build -j2` (.ci/run builds it first).
Tiny seeded pipelines, 2 sampling steps; the bundles are exported once per module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime_py import metrics, native
from runtime_py.bundle import load_manifest, load_reference, manifest_digest
from runtime_py.verify import DevicePipeline, verify

REPO = Path(__file__).resolve().parents[1]
BINARY = native.find_binary()
pytestmark = pytest.mark.skipif(BINARY is None, reason="adm-run is not built (cmake -S . -B build && "
                                                       "cmake --build build -j2)")
# The native and the Python runner call the same ExecuTorch kernels and mirror the same float32
# sampler: their outputs must agree within the fp32 parity floor of export (toolkit.parity).
# (On this host they are bit-identical; the floor leaves room for other thread counts.)
MIN_NATIVE_PARITY_SNR_DB = 60.0
STEPS = 2


def tiny_pipeline(*, folded: bool = False):
    from toolkit.checkpoint import Pipeline, PipelineConfig
    from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE
    from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet

    torch.manual_seed(0)
    return Pipeline(config=PipelineConfig(name="tiny", default_steps=STEPS, default_guidance=2.0,
                                          guidance_folded=folded),
                    denoiser=SoftAlignUNet(SOFTALIGN_PRESETS["tiny"]).eval(),
                    vae=OobleckVAE(OOBLECK_PRESETS["tiny"]).eval())


def _int8_plan(pipe) -> dict:
    """W8A16 everywhere the presets allow: int8 weights, int8 activations per time step on
    XNNPACK (dynamic, so no calibration set is needed)."""
    from calibration.fakequant import quantizable_leaves
    from calibration.plan import make_plan
    from calibration.sensitivity import layer_sizes
    from toolkit.components import component_specs

    sizes, fp32 = layer_sizes(pipe.denoiser)
    decoder = list(quantizable_leaves(component_specs(pipe)["vae_decoder"].module))
    return make_plan("w8a16", sizes, fp32, vae_decoder_layers=decoder, model="tiny")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    from toolkit.bundle import export_bundle

    root = tmp_path_factory.mktemp("native-bundles")
    pipe = tiny_pipeline()
    out = {"fp32": export_bundle(pipe, target="executorch", out_root=root / "fp32")}
    # The tiny random model is not a model worth a budget: the loose one lets the bundle through
    # the export gate; parity with the Python runner is what is checked here.
    out["int8"] = export_bundle(pipe, target="executorch", out_root=root / "int8", plan=_int8_plan(pipe),
                                quality_budget={"latent_snr_db_min": -100.0, "max_relative_to_spread": 1e9})
    out["folded"] = export_bundle(tiny_pipeline(folded=True), target="executorch", out_root=root / "folded")
    return out


def adm_run(*args, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BINARY), *map(str, args)], capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def native_outputs(bundle: Path, tmp: Path) -> dict[str, np.ndarray]:
    proc = adm_run("verify", bundle, "--runs", 0, "--out", tmp / "report.json", "--outputs", tmp / "out")
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    return {k: np.load(tmp / "out" / f"{k}.npy") for k in ("vocal_latent", "latents", "audio")}


@pytest.mark.parametrize("kind", ["fp32", "int8", "folded"])
def test_native_outputs_equal_the_python_runners(kind, bundles, tmp_path):
    bundle = bundles[kind]
    manifest = load_manifest(bundle)
    if kind == "int8":
        lowering = manifest["components"]["denoiser"]["details"]["lowering"]
        assert any(e["applied"]["weights"] == "int8" for e in lowering["layers"].values())
    assert manifest["sampler"]["guidance_folded"] == (kind == "folded")
    got = native_outputs(bundle, tmp_path)
    inputs, _ = load_reference(bundle, manifest)
    pipe = DevicePipeline(bundle, manifest, threads=None)  # ExecuTorch's Python runtime
    for i in range(inputs["vocals"].shape[0]):
        cond = pipe.encode(inputs["vocals"][i:i + 1])
        assert metrics.snr_db(cond[0], got["vocal_latent"][i]) >= MIN_NATIVE_PARITY_SNR_DB
        for j in range(inputs["noise"].shape[1]):
            latent = pipe.sample(cond, inputs["noise"][i, j:j + 1])
            audio = pipe.decode(latent)
            assert metrics.snr_db(latent[0], got["latents"][i, j]) >= MIN_NATIVE_PARITY_SNR_DB, (kind, i, j)
            assert metrics.snr_db(audio[0], got["audio"][i, j]) >= MIN_NATIVE_PARITY_SNR_DB, (kind, i, j)


def test_native_verify_report_has_the_report_schema(bundles, tmp_path):
    out = tmp_path / "native.report.json"
    proc = adm_run("verify", bundles["fp32"], "--runs", 2, "--warmup", 1, "--threads", 1, "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    for key in ("format_version", "bundle", "target", "device", "latency", "end_to_end", "memory",
                "quality", "budget", "status", "reason"):
        assert key in report
    assert report["runner"] == "native" and report["status"] == "pass" and report["target"] == "executorch"
    assert report["device"]["threads"] == 1
    for name in ("vae_encoder", "denoiser", "vae_decoder"):
        assert {"min_ms", "p50_ms", "p90_ms", "runs", "warmup"} <= set(report["latency"][name])
    e2e = report["end_to_end"]
    assert e2e["steps"] == STEPS and e2e["denoiser_calls_per_step"] == 1.0  # one batch-2 CFG call
    assert e2e["min_ms"] <= e2e["p50_ms"] <= e2e["p90_ms"]
    assert report["memory"]["peak_rss_mb"] > 0
    agg = report["quality"]["aggregate"]
    assert agg["latent_snr_db"] > 40 and len(report["quality"]["per_example"]) == 4
    line = report["budget"]["lines"][0]
    assert line["metric"].startswith("latent_snr_db") and line["pass"] is True
    # The distances relative to the seed spread need runtime_py's numpy metrics: listed, not judged.
    assert [n["limit"] for n in report["budget"]["not_evaluated"]] == ["max_relative_to_spread"]
    # The same figure as runtime_py computes from the same outputs.
    python_side = verify(bundles["fp32"], runs=1, warmup=0, runner="native")
    assert agg["latent_snr_db"] == pytest.approx(python_side["quality"]["aggregate"]["latent_snr_db"], rel=1e-9)


def test_runtime_py_uses_native_by_default_and_python_on_request(bundles):
    report = verify(bundles["fp32"], runs=1, warmup=0)
    assert report["runner"] == "native" and report["status"] == "pass", report["reason"]
    assert "C++ runtime" in report["device"]["runtime"]["executorch"]
    assert {"p50_ms"} <= set(report["latency"]["denoiser"]) and report["memory"]["peak_rss_mb"] > 0
    python = verify(bundles["fp32"], runs=1, warmup=0, runner="python")
    assert python["runner"] == "python" and python["status"] == "pass"
    for key in ("latent_snr_db", "log_mel_l1"):
        assert report["quality"]["aggregate"][key] == pytest.approx(python["quality"]["aggregate"][key], rel=1e-6)


def test_runner_choice():
    assert native.choose_runner("executorch", None) == "native"
    assert native.choose_runner("executorch", "python") == "python"
    assert native.choose_runner("onnx", None) == "python"
    with pytest.raises(native.NativeRunnerError, match="ExecuTorch|executorch"):
        native.choose_runner("onnx", "native")


BLOCK_TORCH = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "toolkit", "calibration", "targets"):
                raise ImportError(f"{name} is blocked: runtime_py must run without it")
    sys.meta_path.insert(0, _Block())
""")


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_verify_without_torch_passes_through_the_native_runner(kind, bundles, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "blocked" in check.stderr
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "runtime_py", "verify", str(bundles[kind]), "--runs", "1",
                           "--warmup", "0", "--out", str(out)], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["status"] == "pass" and report["runner"] == "native"
    assert json.loads(proc.stdout)["runner"] == "native"
    # Without the native runner the same host cannot run it (the Python runtime needs torch).
    proc = subprocess.run([sys.executable, "-m", "runtime_py", "verify", str(bundles[kind]), "--runner", "python",
                           "--out", str(tmp_path / "py.json")], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 3 and json.loads((tmp_path / "py.json").read_text())["status"] == "unavailable"


def _copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy)
    return copy


@pytest.mark.parametrize("verb", ["verify", "run", "check"])
def test_one_changed_byte_in_a_pte_is_refused_before_loading(verb, bundles, tmp_path):
    copy = _copy(bundles["fp32"], tmp_path)
    path = copy / "denoiser.pte"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    extra = {"verify": ["--out", tmp_path / "r.json"],
             "run": ["--vocals", tmp_path / "v.npy", "--noise", tmp_path / "n.npy", "--out-dir", tmp_path / "o"],
             "check": []}[verb]
    proc = adm_run(verb, copy, *extra)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "sha256 mismatch" in proc.stderr and str(path) in proc.stderr
    assert "latency" not in proc.stdout  # nothing ran
    if verb == "verify":
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["status"] == "fail" and "denoiser.pte" in report["reason"]


def _edit_manifest(bundle: Path, edit, *, reseal: bool = False) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    if reseal:  # as if exported so: the check under test is not the seal's
        manifest["manifest_sha256"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


BAD_BUNDLES = {
    "missing component file": (lambda b: (b / "vae_decoder.pte").unlink(), "vae_decoder.pte: listed in the manifest but missing"),
    "missing component entry": (lambda b: _edit_manifest(b, lambda m: m["components"].pop("denoiser")),
                                "components.denoiser is missing"),
    "malformed manifest": (lambda b: (b / "manifest.json").write_text('{"format_version": 1, "target": '),
                           "not valid JSON"),
    "manifest not an object": (lambda b: (b / "manifest.json").write_text("[1, 2]"), "must be a JSON object"),
    "wrong field type": (lambda b: _edit_manifest(b, lambda m: m["sampler"].update(t="soon")),
                         "'sampler.t' has the wrong type"),
    "short sampler table": (lambda b: _edit_manifest(b, lambda m: m["sampler"]["alpha"].pop()), "sampler table lengths"),
    "not executorch": (lambda b: _edit_manifest(b, lambda m: m.update(target="onnx"), reseal=True),
                       "field 'target' is 'onnx'; adm-run runs ExecuTorch bundles only"),
    "no manifest": (lambda b: (b / "manifest.json").unlink(), "manifest.json: not found"),
    "unlisted file": (lambda b: (b / "stray.bin").write_bytes(b"x"), "stray.bin: not listed in the manifest"),
}


@pytest.mark.parametrize("case", sorted(BAD_BUNDLES))
def test_bad_bundles_get_a_clear_error_and_a_nonzero_exit(case, bundles, tmp_path):
    copy = _copy(bundles["fp32"], tmp_path)
    damage, message = BAD_BUNDLES[case]
    damage(copy)
    for verb, extra in (("check", []), ("verify", ["--out", tmp_path / "r.json"])):
        proc = adm_run(verb, copy, *extra)
        assert proc.returncode == 2, (verb, proc.returncode, proc.stderr)  # never a crash (< 0) or 3
        assert message in proc.stderr, proc.stderr
        assert proc.stderr.startswith("adm-run: error: ")


def test_unknown_manifest_fields_are_ignored(bundles, tmp_path):
    copy = _copy(bundles["fp32"], tmp_path)

    def add_field_and_reseal(m):
        m["future_field"] = {"anything": [1, 2.5, None]}
        m["manifest_sha256"] = manifest_digest(m)

    _edit_manifest(copy, add_field_and_reseal)
    proc = adm_run("check", copy)
    assert proc.returncode == 0, proc.stderr


def test_an_edited_manifest_breaks_its_seal(bundles, tmp_path):
    copy = _copy(bundles["fp32"], tmp_path)
    _edit_manifest(copy, lambda m: m["quality_budget"].update(latent_snr_db_min=-1000.0))
    proc = adm_run("verify", copy, "--out", tmp_path / "r.json")
    assert proc.returncode == 2 and "'manifest_sha256' does not match" in proc.stderr, proc.stderr
    _edit_manifest(copy, lambda m: m.pop("manifest_sha256"))
    proc = adm_run("check", copy)
    assert proc.returncode == 2 and "'manifest_sha256' is missing" in proc.stderr, proc.stderr


def test_the_seal_is_computed_as_runtime_py_computes_it(tmp_path):
    """Python's json.dumps canonical text (sorted keys, repr floats, NaN / Infinity, escaped
    non-ASCII) reproduced in C++: random floats over the whole double range, odd strings."""
    import random
    import struct

    rng = random.Random(0)
    floats = [rng.uniform(-1, 1) * 10 ** rng.uniform(-30, 30) for _ in range(2000)]
    floats += [struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0] for _ in range(2000)]
    floats += [0.0, -0.0, 1.0, 1e15, 1e16, 1e-4, 1e-5, 0.1, float("inf"), float("-inf"), 5e-324]
    chars = ["a", "é", "☃", "𝄞", "\n", "\t", "\x01", '"', "\\", "/", "NaN", "Infinity", " "]
    strings = {"".join(rng.choice(chars) for _ in range(6)) + str(i): rng.choice(chars) for i in range(100)}
    manifest = {"floats": floats, "strings": strings, "ints": [rng.randint(-2 ** 62, 2 ** 62) for _ in range(20)],
                "nested": [{"b": True, "n": None, "f": 2.0}, []], "nan": float("nan"), "manifest_sha256": "-"}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2))
    proc = adm_run("digest", path, check=True)
    assert proc.stdout.strip() == manifest_digest(json.loads(path.read_text()))


def test_bad_arguments_exit_2_with_usage(bundles, tmp_path):
    for args in (["frobnicate", bundles["fp32"]], ["verify"], ["verify", bundles["fp32"], "--runs", "-1"],
                 ["run", bundles["fp32"]], ["verify", bundles["fp32"], "--bogus", "1"]):
        proc = adm_run(*args)
        assert proc.returncode == 2 and "usage:" in proc.stderr, (args, proc.stderr)


def test_run_reads_and_writes_npy_and_matches_verify(bundles, tmp_path):
    bundle = bundles["fp32"]
    inputs, _ = load_reference(bundle, load_manifest(bundle))
    np.save(tmp_path / "vocals.npy", inputs["vocals"])
    np.save(tmp_path / "noise.npy", inputs["noise"][:, 0])
    np.save(tmp_path / "noise64.npy", inputs["noise"][:, 0].astype(np.float64))
    out = tmp_path / "out"
    proc = adm_run("run", bundle, "--vocals", tmp_path / "vocals.npy", "--noise", tmp_path / "noise.npy",
                   "--out-dir", out, "--runs", 1, "--warmup", 0, "--etdump", tmp_path / "etdump", check=True)
    assert "end_to_end" in proc.stdout and "peak RSS" in proc.stdout
    want = native_outputs(bundle, tmp_path / "v")
    np.testing.assert_array_equal(np.load(out / "latents.npy"), want["latents"][:, 0])
    np.testing.assert_array_equal(np.load(out / "audio.npy"), want["audio"][:, 0])
    timing = json.loads((out / "timing.json").read_text())
    assert timing["runner"] == "native" and timing["memory"]["peak_rss_mb"] > 0
    assert set(timing["latency"]) == {"vae_encoder", "denoiser", "vae_decoder"}
    for name in ("vae_encoder", "denoiser", "vae_decoder"):  # an ExecuTorch profile per component
        assert (tmp_path / "etdump" / f"{name}.etdp").stat().st_size > 0
    bad = adm_run("run", bundle, "--vocals", tmp_path / "vocals.npy", "--noise", tmp_path / "noise64.npy",
                  "--out-dir", out)
    assert bad.returncode == 2 and "noise64.npy" in bad.stderr and "float32" in bad.stderr


def test_benchmark_workers_and_table(bundles, tmp_path):
    from benchmarks.native_runner import build_table, row, run_verify

    rows = []
    for runner in ("native", "python"):
        report = run_verify(runner, bundles["fp32"], tmp_path / f"{runner}.json", threads=1, runs=1, warmup=0)
        assert report["status"] == "pass" and report.get("runner") == runner
        rows.append(row("fp32", runner, report))
    assert rows[0]["rss"] < rows[1]["rss"]  # no torch in the native process
    table = build_table(rows).splitlines()
    assert len(table) == 2 + 2 + 1 and "python / native time" in table[-1]
