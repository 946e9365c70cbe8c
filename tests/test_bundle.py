"""Bundles and runtime_py: manifest schema, hashes, atomic writes, the numpy sampler, no torch."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime_py.bundle import BundleError, load_manifest, validate_manifest
from runtime_py.sampler import guided, sample_ddim as sample_ddim_np
from runtime_py.verify import verify
from toolkit.bundle import export_bundle
from toolkit.checkpoint import Pipeline, PipelineConfig
from toolkit.diffusion import CosineSchedule, guided_denoiser, make_table, sample_ddim
from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE
from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet

REPO = Path(__file__).resolve().parents[1]


def tiny_pipeline():
    torch.manual_seed(0)
    return Pipeline(config=PipelineConfig(name="tiny", default_steps=3, default_guidance=2.0),
                    denoiser=SoftAlignUNet(SOFTALIGN_PRESETS["tiny"]).eval(),
                    vae=OobleckVAE(OOBLECK_PRESETS["tiny"]).eval())


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory):
    return export_bundle(tiny_pipeline(), target="onnx", out_root=tmp_path_factory.mktemp("b"))


def test_numpy_sampler_matches_torch_sampler():
    pipe = tiny_pipeline()
    table = make_table(CosineSchedule(), 6)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 4, 16, generator=g)
    noise = torch.randn(1, 4, 16, generator=g)
    with torch.no_grad():
        want = sample_ddim(guided_denoiser(pipe.denoiser, cond, 2.5), noise, table).numpy()

    def run_denoiser(x, t, c):
        with torch.no_grad():
            return pipe.denoiser(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c)).numpy()

    got = sample_ddim_np(guided(run_denoiser, cond.numpy(), 2.5, folded=False), noise.numpy(),
                         table.to_dict())
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_manifest_schema_and_hashes(onnx_bundle):
    manifest = load_manifest(onnx_bundle)
    assert manifest["target"] == "onnx" and onnx_bundle.name == "tiny-onnx"
    assert set(manifest["components"]) == {"vae_encoder", "denoiser", "vae_decoder"}
    assert manifest["sampler"]["steps"] == 3 and manifest["sampler"]["denoiser_batch"] == 2
    for comp in manifest["components"].values():
        assert comp["parity"]["status"] == "pass" and comp["parity"]["sqnr_db"] > 60
        assert (onnx_bundle / comp["path"]).is_file()
    assert "reference/inputs.npz" in manifest["files"]
    broken = json.loads(json.dumps(manifest))
    del broken["sampler"]["alpha"][0]
    with pytest.raises(BundleError, match="sampler table"):
        validate_manifest(broken, source="m.json")
    del broken["components"]["denoiser"]
    with pytest.raises(BundleError, match="components.denoiser"):
        validate_manifest(broken, source="m.json")


def test_verify_passes_at_fp32(onnx_bundle):
    report = verify(onnx_bundle, runs=2, warmup=1)
    assert report["status"] == "pass", report["reason"]
    assert report["quality"]["aggregate"]["latent_snr_db"] > 40
    assert report["end_to_end"]["denoiser_calls_per_step"] == 2 / 2  # one batch-2 call per step
    for key in ("format_version", "bundle", "target", "device", "latency", "end_to_end", "memory",
                "quality", "budget", "status", "reason"):
        assert key in report
    assert {"min_ms", "p50_ms", "p90_ms"} <= set(report["latency"]["denoiser"])


def test_one_changed_byte_fails_with_hash_error(onnx_bundle, tmp_path):
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(onnx_bundle, copy)
    path = copy / "denoiser.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    report = verify(copy, runs=1, warmup=0)
    assert report["status"] == "fail" and "sha256 mismatch" in report["reason"]
    assert "denoiser.onnx" in report["reason"]


BLOCK_TORCH = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "toolkit", "calibration", "targets"):
                raise ImportError(f"{name} is blocked: runtime_py must run without it")
    sys.meta_path.insert(0, _Block())
""")


def test_runtime_py_runs_without_torch(onnx_bundle, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "blocked" in check.stderr
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "runtime_py", "verify", str(onnx_bundle), "--runs", "1",
                           "--out", str(out)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["status"] == "pass"
    assert "torch" not in report["device"]["runtime"]


def test_killed_export_leaves_no_bundle(tmp_path, monkeypatch):
    import targets.onnx as onnx_target

    real = onnx_target.export
    calls = []

    def dying_export(spec, **kw):
        calls.append(spec.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed midway")
        return real(spec, **kw)

    monkeypatch.setattr(onnx_target, "export", dying_export)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(tiny_pipeline(), target="onnx", out_root=tmp_path)
    assert list(tmp_path.iterdir()) == [], "no bundle and no temporary directory may remain"


def test_coreml_bundle_reports_unavailable_here(tmp_path):
    from runtime_py.runners import runtime_unavailable

    if runtime_unavailable("coreml") is None:
        pytest.skip("this host runs Core ML")
    bundle = export_bundle(tiny_pipeline(), target="coreml", out_root=tmp_path)
    manifest = load_manifest(bundle)
    assert all(c["parity"]["status"] == "not run" for c in manifest["components"].values())
    report = verify(bundle)
    assert report["status"] == "unavailable" and "macOS" in report["reason"]
