"""Bundles defend themselves: a sealed manifest, runtime versions compared, clear errors and exit
codes for malformed, altered or inconsistent bundles, no leftovers from killed exports."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime_py import runners
from runtime_py.__main__ import EXIT_FAIL, EXIT_PASS, EXIT_UNAVAILABLE
from runtime_py.bundle import MANIFEST, BundleError, load_manifest, manifest_digest
from runtime_py.verify import verify
from tests.test_bundle import tiny_pipeline
from toolkit.bundle import export_bundle

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory):
    return export_bundle(tiny_pipeline(), target="onnx", out_root=tmp_path_factory.mktemp("b"))


def _copy(bundle: Path, tmp_path: Path, name: str = "copy") -> Path:
    out = tmp_path / name
    shutil.copytree(bundle, out)
    return out


def _edit_manifest(bundle: Path, edit, *, reseal: bool) -> None:
    path = bundle / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    if reseal:
        manifest["manifest_sha256"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime_py", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO)


def test_manifest_is_sealed_and_an_edit_is_refused(onnx_bundle, tmp_path):
    manifest = load_manifest(onnx_bundle)
    assert manifest["manifest_sha256"] == manifest_digest(manifest)
    copy = _copy(onnx_bundle, tmp_path)
    # Loosen the budget without touching any component file: only the seal can tell.
    _edit_manifest(copy, lambda m: m["quality_budget"].update(latent_snr_db_min=-100.0), reseal=False)
    with pytest.raises(BundleError, match="manifest_sha256.*edited or corrupted"):
        load_manifest(copy)
    report = verify(copy, runs=1, warmup=0)
    assert report["status"] == "fail" and "manifest_sha256" in report["reason"]


def test_wrong_target_field_is_named(onnx_bundle, tmp_path):
    copy = _copy(onnx_bundle, tmp_path)
    _edit_manifest(copy, lambda m: m.update(target="executorch"), reseal=True)
    with pytest.raises(BundleError, match=r"components\.vae_encoder\.path is 'vae_encoder\.onnx'.*\.pte"):
        load_manifest(copy)
    _edit_manifest(copy, lambda m: m.update(target="tflite"), reseal=True)
    with pytest.raises(BundleError, match="field 'target' is 'tflite'"):
        load_manifest(copy)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (b"\xff\xfe\x00", "not UTF-8"),
])
def test_malformed_manifest_is_a_clear_error_and_exit_1(onnx_bundle, tmp_path, content, message):
    copy = _copy(onnx_bundle, tmp_path)
    path = copy / MANIFEST
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(BundleError, match=message):
        load_manifest(copy)
    proc = _cli("verify", copy, "--runs", "1", "--out", tmp_path / "r.json")
    assert proc.returncode == EXIT_FAIL, proc.stderr
    assert "Traceback" not in proc.stderr
    assert message in json.loads((tmp_path / "r.json").read_text())["reason"]


def test_structurally_wrong_fields_never_escape_as_tracebacks(onnx_bundle, tmp_path):
    copy = _copy(onnx_bundle, tmp_path)
    _edit_manifest(copy, lambda m: m.update(components=["denoiser"]), reseal=True)
    with pytest.raises(BundleError, match="'components' must be an object"):
        load_manifest(copy)
    _edit_manifest(copy, lambda m: m.update(sampler={"t": 3}), reseal=True)
    with pytest.raises(BundleError, match=str(copy / MANIFEST)):
        load_manifest(copy)
    _edit_manifest(copy, lambda m: m.pop("components"), reseal=True)
    with pytest.raises(BundleError, match="field 'components' is missing"):
        load_manifest(copy)


def test_missing_component_file_is_named(onnx_bundle, tmp_path):
    copy = _copy(onnx_bundle, tmp_path)
    (copy / "denoiser.onnx").unlink()
    report = verify(copy, runs=1, warmup=0)
    assert report["status"] == "fail" and "denoiser.onnx" in report["reason"] and "missing" in report["reason"]


def test_verify_exit_codes(onnx_bundle, tmp_path):
    assert _cli("verify", onnx_bundle, "--runs", "1", "--out", tmp_path / "p.json").returncode == EXIT_PASS
    strict = _copy(onnx_bundle, tmp_path, "strict")
    _edit_manifest(strict, lambda m: m["quality_budget"].update(latent_snr_db_min=1e9), reseal=True)
    proc = _cli("verify", strict, "--runs", "1", "--out", tmp_path / "f.json")
    assert proc.returncode == EXIT_FAIL
    assert json.loads((tmp_path / "f.json").read_text())["status"] == "fail"
    assert EXIT_UNAVAILABLE not in (EXIT_PASS, EXIT_FAIL)


def test_unavailable_is_non_zero_unless_allowed(onnx_bundle, tmp_path, monkeypatch):
    from runtime_py.__main__ import main

    entry = runners.RUNTIMES["onnx"]
    monkeypatch.setitem(runners.RUNTIMES, "onnx", runners.TargetRuntime(
        entry.name, entry.runner, entry.file_suffix, entry.distribution, lambda: "no ONNX Runtime here"))
    out = tmp_path / "u.json"
    assert main(["verify", str(onnx_bundle), "--out", str(out)]) == EXIT_UNAVAILABLE
    assert json.loads(out.read_text())["status"] == "unavailable"
    assert main(["verify", str(onnx_bundle), "--out", str(out), "--allow-unavailable"]) == 0


def test_runtime_version_mismatch_warns_and_known_incompatibility_fails(onnx_bundle, tmp_path, monkeypatch):
    copy = _copy(onnx_bundle, tmp_path)
    _edit_manifest(copy, lambda m: m["runtime"].update(version_at_export="onnxruntime 0.9.0"), reseal=True)
    report = verify(copy, runs=1, warmup=0)
    assert report["status"] == "pass"
    assert report["runtime_version"]["status"] == "warning"
    assert any("onnxruntime 0.9.0" in w for w in report["warnings"])

    # ExecuTorch: a program from a newer exporter than the device's runtime is refused.
    monkeypatch.setattr(runners, "runtime_version", lambda target: "executorch 1.4.0")
    check = runners.version_check("executorch", "executorch 1.5.1")
    assert check["status"] == "error" and "newer ExecuTorch" in check["note"]
    assert runners.version_check("executorch", "executorch 1.3.0")["status"] == "warning"
    assert runners.version_check("executorch", "executorch 1.4.0")["status"] == "same"
    assert runners.version_check("executorch", None)["status"] == "unknown"


def test_next_export_removes_what_a_killed_export_left(tmp_path):
    stale = tmp_path / ".tiny-onnx.partial-abc123"
    (stale / "reference").mkdir(parents=True)
    (stale / "denoiser.onnx").write_bytes(b"half")
    bundle = export_bundle(tiny_pipeline(), target="onnx", out_root=tmp_path)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [bundle.name]


def _component(*layers):
    return {"details": {"lowering": {"layers": {
        f"l{i}": {"requested": {"weights": rw, "activations": ra}, "applied": {"weights": aw, "activations": aa},
                  "honoured": (rw, ra) == (aw, aa), "why": None if (rw, ra) == (aw, aa) else "target rule"}
        for i, ((rw, ra), (aw, aa)) in enumerate(layers)}}}}


def test_bundle_label_names_what_was_applied():
    from toolkit.bundle import applied_label, lowering_differences

    plan = {"name": "w8a16"}
    honoured = {"denoiser": _component((("int8", "int8"), ("int8", "int8")), (("fp16", "fp16"), ("fp32", "fp32")))}
    assert applied_label("w8a8", honoured, plan=plan) == "w8a8"  # fp16 run as fp32: reported, not renamed
    assert len(lowering_differences(honoured)) == 1
    float_only = {"denoiser": _component((("int8", "fp16"), ("fp32", "fp32")))}  # TensorRT's W8A16
    assert applied_label("w8a16", float_only, plan=plan) == "fp32-from-w8a16"
    partial = {"denoiser": _component((("int8", "int8"), ("int8", "int8")), (("int4", "int8"), ("fp32", "fp32")))}
    assert applied_label("w4a8", partial, plan=plan) == "w4a8-partial"
    assert applied_label("fp32", {}, plan=None) == "fp32"


def test_export_summary_says_what_was_applied_and_how_it_was_checked():
    from toolkit.bundle import export_summary, lowering_differences

    components = {"denoiser": {**_component((("int8", "fp16"), ("fp32", "fp32"))),
                               "parity": {"status": "pass", "sqnr_db": 31.2}}}
    manifest = {"precision": "fp32-from-w8a16", "requested_precision": "w8a16", "components": components,
                "lowering_differences": lowering_differences(components),
                "host_check": {"status": "pass", "kind": "simulation of the plan", "how": "not the lowered graph"}}
    text = "\n".join(export_summary(manifest))
    assert "precision applied: fp32-from-w8a16 (requested w8a16)" in text
    assert "1 planned layers not lowered as requested" in text and "target rule" in text
    assert "denoiser 31.2 dB" in text and "simulation of the plan" in text


def test_tree_digest_follows_content_not_the_path_as_typed(tmp_path):
    from toolkit.fingerprint import tree_digest

    root = tmp_path / "calib"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"abc")
    (root / "sub" / "b.bin").write_bytes(b"def")
    (root / ".partial").write_bytes(b"ignored")
    first = tree_digest(root)
    assert tree_digest(tmp_path / "calib" / "sub" / "..") == first  # typed another way: same inputs
    (root / "sub" / "b.bin").write_bytes(b"deg")
    assert tree_digest(root) != first  # same path, other content: another input
