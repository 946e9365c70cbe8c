"""``toolkit run`` end to end on a tiny seeded checkpoint: the whole chain, reuse, and --out safety."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from tests.test_bundle import tiny_pipeline
    from toolkit.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, tiny_pipeline())
    return path


def test_run_chain_reuse_and_refusal(tiny_checkpoint, tmp_path, capsys):
    from toolkit.cli import main

    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["run", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--cache", str(cache),
            "--target", "onnx", "--target", "tensorrt", "--runs", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    for stage in ("reference", "calibration set", "sensitivity", "plan", "export fp32", "verify", "report"):
        assert f"] {stage} done in" in err, stage
    summary = json.loads((out / "summary.json").read_text())
    statuses = {name: r["status"] for name, r in summary["reports"].items()}
    # fp32 and quantized bundles for both targets; ONNX runs here, TensorRT is unavailable but complete.
    assert statuses["tiny-onnx"] == "pass" and statuses["tiny-tensorrt"] == "unavailable"
    quantized = [n for n in statuses if n not in ("tiny-onnx", "tiny-tensorrt")]
    assert len(quantized) == 2 and all(statuses[n] in ("pass", "unavailable") for n in quantized), statuses
    for name in statuses:
        assert (out / "bundles" / name / "manifest.json").is_file()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["search"]["measured"]["attempts"], "the plan records how it was measured"
    page = (out / "report.html").read_text()
    assert page.count("<audio") >= 4 and "Lowering per quantized bundle" in page
    clips = json.loads((out / "listening" / "clips.json").read_text())
    assert [c["label"].split(" ")[0] for c in clips["clips"]][:3] == ["vocal", "true", "full"]

    # --out is never overwritten silently.
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err
    # With --force, the calibration set and the sensitivity table are reused (same inputs).
    assert main([*argv, "--force"]) == 0
    err = capsys.readouterr().err
    assert "calibration set done" in err and "reused" in err.split("] calibration set done")[1].splitlines()[0]
    assert "reused" in err.split("] sensitivity done")[1].splitlines()[0]

    # toolkit report rebuilds the same page from the reports (and the run's listening clips).
    reports = sorted(str(p) for p in (out / "reports").glob("*.json"))
    assert main(["report", *reports, "--run", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = (tmp_path / "merged" / "report.html").read_text()
    assert merged.count("<audio") == page.count("<audio")


def test_first_hour_refusals_come_before_any_compute(tmp_path, capsys):
    """Bad arguments and paths are refused with the file named, before a model is loaded."""
    import numpy as np
    import soundfile as sf

    from toolkit.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["run", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"

    vocals = tmp_path / "v.wav"
    sf.write(vocals, np.zeros(1600, np.float32), 16000)
    for argv, says in ((["--vocals", str(tmp_path / "none.wav"), "--out", str(tmp_path / "a.wav")], "none.wav"),
                       (["--vocals", str(vocals), "--out", str(tmp_path)], "is a directory"),
                       (["--vocals", str(vocals), "--out", str(tmp_path / "a.flac")], ".wav"),
                       (["--vocals", str(vocals), "--out", str(tmp_path / "a.wav"), "--steps", "0"], "--steps"),
                       (["--vocals", str(vocals), "--out", str(tmp_path / "a.wav"), "--guidance", "-1"], "--guidance")):
        assert main(["generate", *argv]) == 2
        assert says in capsys.readouterr().err
    assert not list(tmp_path.glob(".*tmp*"))


def test_help_shows_defaults():
    from toolkit.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "verb").choices
    assert "(default: 3)" in sub["run"].format_help()
    assert "(default: 0)" in sub["data"].format_help() or "(default: 16000)" in \
        next(a for a in sub["data"]._actions if a.dest == "data_verb").choices["synth"].format_help()


def test_calibrate_names_every_unusable_track_at_once(tiny_checkpoint, tmp_path, capsys):
    import numpy as np
    import soundfile as sf

    from toolkit.cli import main

    for name, n in (("short1", 1600), ("short2", 800), ("ok", 32000)):
        (tmp_path / "data" / name).mkdir(parents=True)
        for stem in ("vocals", "accompaniment"):
            sf.write(tmp_path / "data" / name / f"{stem}.wav", np.full(n, 0.1, np.float32), 16000)
    assert main(["calibrate", "--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "calib")]) == 2
    err = capsys.readouterr().err
    assert "2 track(s)" in err and "short1" in err and "short2" in err and "ok/" not in err
    assert not (tmp_path / "calib").exists()
