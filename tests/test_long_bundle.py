"""Long-audio bundles (issue 18): exported at a multiple of the training length, LiteFocus's compensation
indices a denoiser input that runtime_py and adm-run draw per call (runtime_py.compensation)."""

import json
import subprocess

import numpy as np
import pytest
import torch

from runtime_py import native
from runtime_py.bundle import load_manifest, load_reference
from runtime_py.compensation import HASH, draw_indices
from runtime_py.verify import DevicePipeline, quality_against_reference, verify
from tests.test_long_audio import tiny_pipeline
from toolkit.bundle import export_bundle
from toolkit.cli import main
from toolkit.models.litefocus import LiteFocusConfig, compensation_indices

FRAMES = 64  # 4x the tiny model's 16 training frames; its bottleneck: 32 keys
LITEFOCUS = LiteFocusConfig(ratio=0.25, band=2, seed=5)


@pytest.fixture(scope="module")
def et_bundle(tmp_path_factory):
    return export_bundle(tiny_pipeline(), target="executorch", out_root=tmp_path_factory.mktemp("et"),
                         frames=FRAMES, litefocus=LITEFOCUS)


@pytest.mark.parametrize("keys,ratio", [(8, 1.0), (32, 0.25), (1024, 0.1), (4097, 0.05)])
@pytest.mark.parametrize("seed,call", [(0, 0), (5, 7), (-3, 2), (2**40 + 9, 123456)])
def test_draw_is_the_same_in_torch_numpy_and_cpp(keys, ratio, seed, call):
    count = int(np.floor(ratio * keys))
    device = draw_indices(keys, count, seed=seed, call=call)
    np.testing.assert_array_equal(compensation_indices(keys, ratio, seed=seed, call=call).numpy(), device)
    binary = native.find_binary()
    if binary is None:
        pytest.skip("adm-run is not built (cmake -S . -B build && cmake --build build)")
    out = subprocess.run([str(binary), "draw", "--keys", str(keys), "--count", str(count), "--seed", str(seed),
                          "--call", str(call)], capture_output=True, text=True, check=True).stdout
    np.testing.assert_array_equal(np.array(json.loads(out), dtype=np.int64), device)


def test_manifest_records_length_attention_and_the_draw(et_bundle):
    assert et_bundle.name == "tiny-64f-litefocus-executorch"
    m = load_manifest(et_bundle)
    assert m["latent"] == {"frames": FRAMES, "training_frames": 16}
    assert m["audio"]["segment_samples"] == FRAMES * 8  # the tiny VAE's hop
    att = m["attention"]
    assert att["mode"] == "litefocus" and att["ratio"] == 0.25 and att["band"] == 2
    comp = att["compensation"]
    assert comp["input"] == "comp_idx" and comp["keys"] == 32 and comp["count"] == 8
    assert comp["seed"] == 5 and comp["hash"] == HASH and comp["dtype"] == "int64" and comp["shape"] == [8]
    den = {i["name"]: i for i in m["components"]["denoiser"]["inputs"]}
    assert den["comp_idx"] == {"name": "comp_idx", "shape": [8], "dtype": "int64"}
    assert den["x"]["shape"] == [2, 4, FRAMES]
    assert m["components"]["denoiser"]["parity"]["status"] == "pass"
    inputs, outputs = load_reference(et_bundle, m)
    assert inputs["noise"].shape == (2, 2, 4, FRAMES) and outputs["latents"].shape == (2, 2, 4, FRAMES)


def test_python_runner_passes_with_the_drawn_indices_and_not_with_others(et_bundle):
    report = verify(et_bundle, runs=1, warmup=0, runner="python")
    assert report["status"] == "pass", report["reason"]
    assert report["quality"]["aggregate"]["latent_snr_db"] > 60
    m = load_manifest(et_bundle)
    # one call per step (CFG's branches batched), each with its own draw
    assert report["end_to_end"]["denoiser_calls_per_generation"] == m["sampler"]["steps"] == 2
    # The reference was sampled with call k's draw at step k: feeding call k + 1's instead is visible.
    pipe = DevicePipeline(et_bundle, m, threads=None)
    right = pipe.compensation.indices
    pipe.compensation.indices = lambda call: right(call + 1)
    inputs, ref = load_reference(et_bundle, m)
    _, shifted = quality_against_reference(pipe, inputs, ref, m["audio"]["sample_rate"])
    assert shifted["latent_snr_db"] < report["quality"]["aggregate"]["latent_snr_db"] - 30


def test_native_runner_draws_the_same_indices(et_bundle):
    if native.find_binary() is None:
        pytest.skip("adm-run is not built (cmake -S . -B build && cmake --build build)")
    report = verify(et_bundle, runs=1, warmup=0, runner="native")
    assert report["status"] == "pass", report["reason"]
    assert report["runner"] == "native" and report["quality"]["aggregate"]["latent_snr_db"] > 60


def test_export_verb_onnx_litefocus_bundle_verifies(tmp_path, capsys):
    from toolkit.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "tiny", tiny_pipeline())
    assert main(["export", "--checkpoint", str(ckpt), "--target", "onnx", "--frames", "32", "--attention",
                 "litefocus", "--compensation", "0.5", "--out", str(tmp_path / "b")]) == 0
    bundle = tmp_path / "b" / "tiny-32f-litefocus-onnx"
    m = load_manifest(bundle)
    assert m["attention"]["compensation"]["count"] == 8 and m["latent"]["frames"] == 32
    report = verify(bundle, runs=1, warmup=0)
    assert report["status"] == "pass", report["reason"]


def test_dense_long_bundle_has_no_index_input():
    from toolkit.components import attention_record, component_specs

    pipe = tiny_pipeline()
    specs = component_specs(pipe, frames=FRAMES)
    assert specs["denoiser"].input_names == ("x", "t", "cond")
    assert specs["vae_encoder"].example_inputs[0].shape[-1] == FRAMES * 8
    assert attention_record(pipe, FRAMES, None) == {"mode": "dense"}
    lf = component_specs(pipe, frames=FRAMES, litefocus=LITEFOCUS)["denoiser"]
    torch.testing.assert_close(lf.example_inputs[3], compensation_indices(32, 0.25, seed=5, call=0))


@pytest.mark.parametrize("kwargs,match", [
    ({"target": "coreml", "frames": FRAMES, "litefocus": LITEFOCUS}, "target coreml is not supported"),
    ({"target": "tensorrt", "frames": FRAMES, "litefocus": LITEFOCUS}, "--attention dense for tensorrt"),
    ({"target": "onnx", "frames": 16, "litefocus": LITEFOCUS}, "pass --frames above 16"),
    ({"target": "onnx", "frames": 33, "litefocus": None}, "multiples of 2"),
    ({"target": "onnx", "frames": FRAMES, "litefocus": LiteFocusConfig(ratio=0.01)}, "raise --compensation"),
    ({"target": "onnx", "frames": FRAMES, "litefocus": None, "plan": {"default": {}}}, "--plan with --frames"),
])
def test_export_refuses_what_a_long_bundle_cannot_be(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export_bundle(tiny_pipeline(), out_root=tmp_path, **kwargs)


def test_manifest_with_a_bad_draw_record_is_refused(et_bundle, tmp_path):
    import shutil

    from runtime_py.bundle import BundleError, manifest_digest

    copy = tmp_path / "b"
    shutil.copytree(et_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["attention"]["compensation"]["hash"] = "another-hash"
    m["manifest_sha256"] = manifest_digest(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="attention.compensation.hash"):
        load_manifest(copy)
    report = verify(copy, runs=0, warmup=0, runner="python")
    assert report["status"] == "fail" and "attention.compensation.hash" in report["reason"]
    if native.find_binary() is not None:
        proc = subprocess.run([str(native.find_binary()), "check", str(copy)], capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 2 and "attention.compensation.hash" in proc.stderr
