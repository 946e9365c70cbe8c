"""benchmarks/quantized_latency.py without exports: its subprocess workers and its table.

The full benchmark (exports, every runtime) runs on purpose from benchmarks/, not here.
"""

from __future__ import annotations

import math

from benchmarks.quantized_latency import VARIANTS, build_table, format_profile, run_job


def test_workers_report_results_errors_and_timeouts(tmp_path):
    eager = run_job({"kind": "eager", "component": "denoiser", "preset": "tiny", "seed": 0, "threads": 1,
                     "warmup": 1, "runs": 2, "count_flops": True}, work=tmp_path, timeout_s=120, threads=1)
    assert eager["threads_actual"] == 1 and len(eager["ms"]) == 2 and eager["output_finite"]
    assert eager["flops"] > 0 and eager["macs"] > 0  # analytic MACs (toolkit.macs) for the floor
    failed = run_job({"kind": "runtime", "runtime": "onnx", "path": str(tmp_path / "missing.onnx"),
                      "component": "denoiser", "preset": "tiny", "seed": 0, "threads": 1, "warmup": 0,
                      "runs": 1}, work=tmp_path, timeout_s=120)
    assert "FileNotFoundError" in failed["error"]
    slow = run_job({"kind": "eager", "component": "denoiser", "preset": "tiny", "seed": 0, "threads": 1,
                    "warmup": 0, "runs": 10**7, "count_flops": False}, work=tmp_path, timeout_s=1)
    assert slow.get("timeout")


def test_table_rows_ratios_and_profile_text():
    latency = {f"{r}/{p}": {"1": {"p50_ms": 10.0 * (i + 1), "min_ms": 9.0}, "2": {"p50_ms": 5.0 * (i + 1)}}
               for i, (r, p) in enumerate(VARIANTS)}
    latency["onnx/int8"]["2"] = {"error": "timeout after 1 s", "timeout": True}
    result = {"component": "denoiser", "preset": "tiny", "macs": 1e9, "latency": latency,
              "inputs": {"x": [2, 4, 16], "t": [2], "cond": [2, 4, 16]},
              "exports": {"executorch/int8-static": {"file_bytes": 2e6, "export_s": 3.0,
                                                     "delegation": {"ops_delegated": 10, "ops_total": 10,
                                                                    "delegates": 1}}}}
    # Measured peaks (GMAC/s) per precision and threads: 1e9 MACs at 100 / 200 GMAC/s = 10 / 5 ms.
    rates = {"1": {"gmacs_per_s_best": 100.0}, "2": {"gmacs_per_s_best": 200.0}}
    peaks = {name: {"threads": rates} for name in ("fp32", "int8-static", "int8-frame")}
    table = build_table([result], peaks, [1, 2]).splitlines()
    assert len(table) == 2 + len(VARIANTS)
    static = next(line for line in table if "| executorch | int8-static |" in line)
    # 5th variant: p50 50 / 25 ms | floor 10 / 5 ms | 25 ms / 5 ms floor = 5x | eager 5 ms at 2t: 5x | 2 MB | 3 s
    assert "| 50.0 | 25.0 | 10.0 / 5.00 | 5.00× | 5.00× | 2.00 | 3.0 | 10/10 ops, 1 delegates |" in static
    assert "timeout" in table[-1]
    text = format_profile({"method_execute_ms": 4.0, "delegate_calls_ms": 3.0, "portable_calls_ms": 1.0,
                           "threads": 2, "runs": 5,
                           "top": [{"where": "portable", "op": "native_group_norm.out", "ms": 1.0, "count": 3}]})
    assert "25%" in text and "native_group_norm.out (×3)" in text


def test_vae_probe_runs_on_a_tiny_vae_and_its_command_reruns(tmp_path, capsys):
    import torch

    from benchmarks._record import command_line
    from benchmarks.vae_probe import main
    from toolkit.checkpoint import save_component
    from toolkit.data.synth import write_synth_dataset
    from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE

    torch.manual_seed(0)
    config = OOBLECK_PRESETS["tiny"]
    save_component(tmp_path / "vae", config, OobleckVAE(config).eval())
    write_synth_dataset(tmp_path / "data", n=3, seconds=2.0, sample_rate=config.sample_rate, seed=0, progress=False)
    assert main(["--vae", f"tiny one={tmp_path / 'vae'}", "--train", str(tmp_path / "data"), "--heldout",
                 str(tmp_path / "data"), "--segment-latents", "16", "--context", "2", "--no-append"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0].startswith("tiny one") and len(cells) == 8
    figures = [float(c) for c in cells[1:]]
    assert all(math.isfinite(f) for f in figures)  # every figure was computed (no nan)
    assert all(0.0 <= figures[i] <= 1.0 for i in (0, 1, 6))  # accuracies
    assert all(-1.0 <= figures[i] <= 1.0 for i in (4, 5))  # correlations
    # A name with a space survives the recorded command as one argument.
    assert "--vae 'tiny one=/x'" in command_line("vae_probe.py", ["--vae", "tiny one=/x"])
