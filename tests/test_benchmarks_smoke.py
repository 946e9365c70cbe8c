"""benchmarks/quantized_latency.py without exports: its subprocess workers and its table.

The full benchmark (exports, every runtime) runs on purpose from benchmarks/, not here.
"""

from __future__ import annotations

import math

from benchmarks.quantized_latency import VARIANTS, build_table, format_profile, run_job


def test_workers_report_results_errors_and_timeouts(tmp_path):
    gemm = run_job({"kind": "gemm", "threads": 1, "size": 64, "runs": 3}, work=tmp_path, timeout_s=120,
                   threads=1)
    assert gemm["threads_actual"] == 1 and gemm["gflops_p50"] > 0
    eager = run_job({"kind": "eager", "component": "denoiser", "preset": "tiny", "seed": 0, "threads": 1,
                     "warmup": 1, "runs": 2, "count_flops": True}, work=tmp_path, timeout_s=120, threads=1)
    assert len(eager["ms"]) == 2 and eager["flops"] > 0 and eager["output_finite"]
    failed = run_job({"kind": "runtime", "runtime": "onnx", "path": str(tmp_path / "missing.onnx"),
                      "component": "denoiser", "preset": "tiny", "seed": 0, "threads": 1, "warmup": 0,
                      "runs": 1}, work=tmp_path, timeout_s=120)
    assert "FileNotFoundError" in failed["error"]
    slow = run_job({"kind": "gemm", "threads": 1, "size": 4096, "runs": 50}, work=tmp_path, timeout_s=1)
    assert slow.get("timeout")


def test_table_rows_ratios_and_profile_text():
    latency = {f"{r}/{p}": {"1": {"p50_ms": 10.0 * (i + 1), "min_ms": 9.0}, "2": {"p50_ms": 5.0 * (i + 1)}}
               for i, (r, p) in enumerate(VARIANTS)}
    latency["onnx/int8"]["2"] = {"error": "timeout after 1 s", "timeout": True}
    result = {"component": "denoiser", "preset": "tiny", "flops": 2e9, "latency": latency,
              "inputs": {"x": [2, 4, 16], "t": [2], "cond": [2, 4, 16]},
              "exports": {"executorch/int8": {"file_bytes": 2e6, "export_s": 3.0, "float_layers": ["conv_in"],
                                              "delegation": {"ops_delegated": 9, "ops_total": 10,
                                                             "delegates": 2}}}}
    gemm = {"1": {"gflops_p50": 100.0}, "2": {"gflops_p50": 200.0}}
    table = build_table([result], gemm, [1, 2]).splitlines()
    assert len(table) == 2 + len(VARIANTS)
    et_int8 = next(line for line in table if "int8 (conv_in fp32)" in line)
    # p50 1t, 2t | floor 20 ms at 1t, 10 ms at 2t | 15 / 5 ms at 2 threads | 2 MB | 3 s | delegation
    assert "| 30.0 | 15.0 | 20.0 / 10.0 | 3.00× | 2.00 | 3.0 | 9/10 ops, 2 delegates |" in et_int8
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
