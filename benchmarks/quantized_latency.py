"""Per-component CPU latency of fp32 and W8A8 exports (ExecuTorch/XNNPACK, ONNX Runtime) vs eager.

Two components with random seeded weights (latency does not depend on trained values):

* the SoftAlign denoiser (``--config``, default ``paper``: 15.4 M parameters, latent 64×1024),
  called once per sampler step with both CFG branches: x (2, D, L), t (2,), cond (2, D, L);
* the Oobleck VAE decoder (``--vae``, default ``sao``: Stable Audio Open's, ~78 M parameters),
  weight norm and Snake folded (``fold_for_export``), as ``VAEDecoderExport`` with latent scale 1,
  decoding the latent of one second of audio: ceil(sample_rate / downsampling) frames (22 at SAO's
  44.1 kHz / 2048×, i.e. 1.022 s). Its latency is milliseconds per second of audio.

Each component runs as fp32 eager PyTorch, ExecuTorch fp32 and int8, ONNX Runtime fp32 and int8
(``targets.executorch`` / ``targets.onnx`` export; int8 = every quantizable leaf static W8A8,
calibrated on ``--calib-n`` random inputs of the example shapes, t ~ U(0, 1)), through the runners
of ``runtime_py`` (ONNX Runtime at the level ``runtime_py verify`` uses for the export: BASIC, or
ORT_ENABLE_EXTENDED where the export found integer kernels). Every export and every
timed measurement is its own subprocess with a timeout (NOTES.md: an export+run+threadpool-reset
process hung once); a measurement at n threads sets torch.set_num_threads(n), ORT's
intra_op_num_threads = n, or ExecuTorch's threadpool (reset before loading). Warm-up, then
``--runs`` timed calls; min and p50 are recorded.

ExecuTorch exports the whole graph into XNNPACK (targets/xnnpack_graph.py); each row's delegation
record (ops outside XNNPACK by name, delegate count) goes into the notes. The compute floor of a
row is the MACs of one call (toolkit.macs: convolutions, transposed convolutions, linears,
attention matmuls) divided by XNNPACK's best GEMM rate at the row's precision and thread count,
measured through ExecuTorch on one large exported Linear (benchmarks/xnnpack_peak.py,
``--peak-size``): fp32 rows use the fp32 rate, int8 rows the rate of their int8 scheme (ONNX int8
the static one). A time under its floor is a bug in the floor. When the ExecuTorch int8 denoiser is not faster than
eager fp32, its ETDump profile (and the fp32 program's) is taken and the top operators printed
(``--profile``).

    OMP_NUM_THREADS=1 python benchmarks/quantized_latency.py --config paper --vae sao --runs 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._record import append_section, command_line
from benchmarks.xnnpack_peak import measure_peaks, peak_gmacs, run_worker, time_runs

COMPONENTS = ("denoiser", "vae_decoder")
# (runtime, precision) rows per component, in table order.
VARIANTS = (("eager", "fp32"), ("executorch", "fp32"), ("executorch", "int8"),
            ("executorch", "int8-layer"), ("executorch", "int8-static"), ("onnx", "fp32"), ("onnx", "int8"))
# ExecuTorch int8 is the target's default scheme (targets.executorch.INT8_ACTIVATIONS_ON_XNNPACK,
# "per_frame": int8 activations per latent frame at run time); int8-layer measures each layer and
# runs it static where it keeps the threshold, per frame where not; int8-static runs every layer
# with one calibrated scale per tensor.
INT8_PRECISIONS = ("int8", "int8-layer", "int8-static")
SCHEME_OF = {"int8-layer": "per_layer", "int8-static": "static"}  # "int8": the target's default
AUDIO_SECONDS = 1.0  # the VAE decoder decodes the latent of this much audio per call
CFG_BATCH = 2  # both classifier-free-guidance branches in one denoiser call
# ORT kernels that compute in int8; QDQ around a float Conv runs dequantize + fp32 Conv instead.
ORT_INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "QLinearAdd")
TOP_OPS = 12
# The XNNPACK peak (benchmarks/xnnpack_peak.py) each row's floor divides by.
PEAK_OF = {"eager/fp32": "fp32", "executorch/fp32": "fp32", "onnx/fp32": "fp32",
           "executorch/int8-static": "int8-static",
           "onnx/int8": "int8-static"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Components (built inside the workers, from the preset and the seed)
# ---------------------------------------------------------------------------------------------


def input_shapes(component: str, preset: str) -> dict[str, tuple[int, ...]]:
    if component == "denoiser":
        from toolkit.models.softalign import SOFTALIGN_PRESETS

        d, length = SOFTALIGN_PRESETS[preset].latent_shape
        return {"x": (CFG_BATCH, d, length), "t": (CFG_BATCH,), "cond": (CFG_BATCH, d, length)}
    from toolkit.models.oobleck import OOBLECK_PRESETS

    cfg = OOBLECK_PRESETS[preset]
    return {"latent": (1, cfg.latent_dim, math.ceil(AUDIO_SECONDS * cfg.sample_rate / cfg.downsampling))}


def random_inputs(component: str, preset: str, *, seed: int) -> tuple:
    """Seeded inputs of the deployed shapes: t ~ U(0, 1), everything else N(0, 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(shape, generator=g) if name == "t" else torch.randn(shape, generator=g)
                 for name, shape in input_shapes(component, preset).items())


def build_spec(component: str, preset: str, *, seed: int):
    """The component as a ComponentSpec with random weights drawn from ``seed``."""
    import torch
    from torch import nn

    from toolkit.components import ComponentSpec, VAEDecoderExport

    torch.manual_seed(seed)  # a worker process of its own: the global RNG is ours
    inputs = random_inputs(component, preset, seed=seed)
    if component == "denoiser":
        from toolkit.models.softalign import SOFTALIGN_PRESETS, SoftAlignUNet

        module = SoftAlignUNet(SOFTALIGN_PRESETS[preset]).eval()
        return ComponentSpec("denoiser", module, inputs, ("x", "t", "cond"), ("v",))
    from toolkit.models.oobleck import OOBLECK_PRESETS, OobleckVAE, fold_for_export

    vae = OobleckVAE(OOBLECK_PRESETS[preset])
    vae.encoder = nn.Module()  # only the decoder is exported: do not copy the encoder when folding
    module = VAEDecoderExport(fold_for_export(vae), latent_scale=1.0).eval()
    del vae
    return ComponentSpec("vae_decoder", module, inputs, ("latent",), ("audio",))


def w8a8_plan(module, *, float_layers: tuple[str, ...] = ()) -> dict:
    """Every quantizable leaf static W8A8, except ``float_layers`` (fp32)."""
    from calibration.fakequant import quantizable_leaves
    from calibration.precision import LayerPrecision

    leaves = quantizable_leaves(module)
    unknown = sorted(set(float_layers) - set(leaves))
    if unknown:
        raise KeyError(f"no quantizable layers named {unknown}")
    return {name: LayerPrecision("fp32", "fp32") if name in float_layers else LayerPrecision("int8", "int8")
            for name in leaves}


# ---------------------------------------------------------------------------------------------
# Workers: one export or one measurement per process
# ---------------------------------------------------------------------------------------------


def _quantiles(ms: list[float]) -> dict:
    return {"ms": ms, "min_ms": min(ms), "p50_ms": statistics.median(ms)}


def work_export(job: dict) -> dict:
    from targets import get_target

    spec = build_spec(job["component"], job["preset"], seed=job["seed"])
    plan = calib = None
    if job["precision"] in INT8_PRECISIONS:
        import targets.executorch

        if job["precision"] in SCHEME_OF:
            targets.executorch.INT8_ACTIVATIONS_ON_XNNPACK = SCHEME_OF[job["precision"]]
        plan = w8a8_plan(spec.module)
        calib = [random_inputs(job["component"], job["preset"], seed=job["seed"] + 1 + i)
                 for i in range(job["calib_n"])]
    t0 = time.perf_counter()
    artifact = get_target(job["target"]).export(spec, precision="fp32", plan=plan, calib=calib,
                                                out_dir=Path(job["out_dir"]))
    export_s = time.perf_counter() - t0
    path = Path(job["out_dir"]) / artifact.path
    size = sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*"))  # + ONNX external data
    details = artifact.details
    lowering = details.get("lowering")
    out = {"path": str(path), "export_s": export_s, "file_bytes": size, "precision": artifact.precision,
           "params": sum(p.numel() for p in spec.module.parameters()),
           "lowering": None if lowering is None else {"honoured": lowering["honoured"],
                                                      "planned": len(lowering["layers"]),
                                                      "differs": lowering["differs"][:10]}}
    if lowering is not None and "schemes" in lowering:  # which int8 layers run per frame
        out["per_frame_layers"] = sorted(n for n, k in lowering["schemes"].items() if k.endswith("_frame"))
        out["int8_layers"] = sum(k.startswith("int") for k in lowering["schemes"].values())
    if job["target"] == "executorch":
        delegation = dict(details["delegation"])
        delegation.pop("delegated_ops", None)
        out["delegation"] = delegation
    else:
        out["op_types"] = details["op_types"]
        from runtime_py.verify import runner_options

        out["runner_options"] = runner_options({"details": details})  # what runtime_py verify runs it with
    return out


def work_eager(job: dict) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from toolkit.macs import count_macs, total_macs

    torch.set_num_threads(job["threads"])
    spec = build_spec(job["component"], job["preset"], seed=job["seed"])
    module, inputs = spec.module, spec.example_inputs
    out: dict = {"threads_actual": torch.get_num_threads()}
    with torch.inference_mode():
        if job["count_flops"]:
            with FlopCounterMode(display=False) as counter:
                y = module(*inputs)
            out["flops"] = int(counter.get_total_flops())
            out["macs"] = total_macs(count_macs(module, *inputs))
            out["output_finite"] = bool(torch.isfinite(y).all())
        for _ in range(job["warmup"]):
            module(*inputs)
        ms = []
        for _ in range(job["runs"]):
            t0 = time.perf_counter()
            module(*inputs)
            ms.append(1e3 * (time.perf_counter() - t0))
    return {**out, **_quantiles(ms)}


def _ort_int8_kernels(path: str, level: str = "ORT_ENABLE_BASIC") -> dict[str, int]:
    """Integer-kernel nodes in the session graph ORT actually runs (at the runner's ``level``)."""
    from collections import Counter

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
        counts = Counter(node.op_type for node in graph.node)
    return {op: counts[op] for op in ORT_INT8_KERNELS if counts[op]}


def work_runtime(job: dict) -> dict:
    from runtime_py.runners import load_runner

    runner = load_runner(job["runtime"], Path(job["path"]), threads=job["threads"], **job.get("options", {}))
    arrays = [t.numpy() for t in random_inputs(job["component"], job["preset"], seed=job["seed"])]
    feed = dict(zip(runner.input_names, arrays, strict=True))
    ms = time_runs(runner, feed, warmup=job["warmup"], runs=job["runs"])
    out = {"threads_actual": runner.threads, **_quantiles(ms)}
    if job["runtime"] == "onnx" and job.get("count_int8_kernels"):
        out["ort_int8_kernels"] = _ort_int8_kernels(job["path"], getattr(runner, "optimization", "ORT_ENABLE_BASIC"))
        out["ort_level"] = getattr(runner, "optimization", "ORT_ENABLE_BASIC")
    return out


def etdump_profile(path: str, inputs: list, *, threads: int, warmup: int, runs: int, top: int) -> dict:
    """ETDump of ``warmup + runs`` calls of a .pte: per-operator p50 time per call, delegated and
    portable (also used by song_latency.py)."""
    import torch  # the pybindings need libtorch loaded
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(int(threads))
    module = portable_lib._load_for_executorch(path, enable_etdump=True)
    inputs = [torch.from_numpy(x) if not isinstance(x, torch.Tensor) else x for x in inputs]
    for _ in range(warmup + runs):
        module.run_method("forward", inputs)
    with tempfile.TemporaryDirectory() as tmp:
        etdump = str(Path(tmp) / "profile.etdp")
        module.write_etdump_result_to_file(etdump)
        frame = Inspector(etdump_path=etdump).to_dataframe()
    ops: dict[tuple[str, str], list[float]] = {}
    totals = {"delegate_calls_ms": 0.0, "portable_calls_ms": 0.0, "method_execute_ms": None}
    for _, row in frame.iterrows():
        raw = [float(v) for v in row["raw"]]
        raw = raw[warmup:] or raw  # one sample per call; drop the warm-up calls
        ms = statistics.median(raw)
        name = str(row["event_name"])
        if name == "DELEGATE_CALL":
            totals["delegate_calls_ms"] += ms
        elif name == "OPERATOR_CALL":  # wraps one native_call_* (kernel + dispatch)
            totals["portable_calls_ms"] += ms
        elif name == "Method::execute":
            totals["method_execute_ms"] = ms
        elif bool(row["is_delegated_op"]):
            ops.setdefault(("xnnpack", re.sub(r" #\d+$", "", name)), []).append(ms)
        elif name.startswith("native_call_"):
            ops.setdefault(("portable", name[len("native_call_"):]), []).append(ms)
    ranked = sorted(({"where": where, "op": op, "ms": sum(v), "count": len(v)}
                     for (where, op), v in ops.items()), key=lambda r: -r["ms"])
    return {**totals, "threads": threads, "runs": runs, "top": ranked[:top]}


def work_profile(job: dict) -> dict:
    """ETDump of ``runs`` calls of a .pte: per-operator p50 time per call, delegated and portable."""
    inputs = list(random_inputs(job["component"], job["preset"], seed=job["seed"]))
    return etdump_profile(job["path"], inputs, threads=job["threads"], warmup=job["warmup"],
                          runs=job["runs"], top=job["top"])


WORKERS = {"export": work_export, "eager": work_eager, "runtime": work_runtime,
           "profile": work_profile}


def worker_main(job_path: Path) -> int:
    job = json.loads(job_path.read_text())
    try:
        result = WORKERS[job["kind"]](job)
        code = 0
    except Exception as exc:  # reported to the parent, which records the row as failed
        result = {"error": f"{type(exc).__name__}: {str(exc)[:500]}",
                  "traceback": traceback.format_exc()[-3000:]}
        code = 1
    Path(job["result"]).write_text(json.dumps(result))
    return code


def run_job(job: dict, *, work: Path, timeout_s: float, threads: int | None = None) -> dict:
    """Run one worker job of this script in a fresh process (own session, so a hang is killed whole)."""
    return run_worker(Path(__file__).resolve(), job, work=work, timeout_s=timeout_s, threads=threads)


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def measure_component(component: str, preset: str, *, seed: int, calib_n: int, threads: list[int],
                      warmup: int, runs: int, timeout_s: float, work: Path, artifacts: Path) -> dict:
    """Export the four artifacts of one component, then time every variant at every thread count."""
    base = {"component": component, "preset": preset, "seed": seed}
    out = {"component": component, "preset": preset, "inputs": input_shapes(component, preset),
           "exports": {}, "latency": {}}
    for target, precision in VARIANTS:
        if target == "eager":
            continue
        log(f"[{component}] export {target} {precision} ...")
        job = {**base, "kind": "export", "target": target, "precision": precision,
               "calib_n": calib_n, "out_dir": str(artifacts / component / f"{target}-{precision}")}
        res = run_job(job, work=work, timeout_s=timeout_s)
        log(f"[{component}]   {_describe_export(res)}")
        out["exports"][f"{target}/{precision}"] = res
    for n in threads:
        for runtime, precision in VARIANTS:
            key = f"{runtime}/{precision}"
            log(f"[{component}] time {key} at {n} thread(s) ...")
            timing = {**base, "threads": n, "warmup": warmup, "runs": runs}
            if runtime == "eager":
                res = run_job({**timing, "kind": "eager", "count_flops": n == threads[0]},
                              work=work, timeout_s=timeout_s, threads=n)
            else:
                export = out["exports"][key]
                if "error" in export:
                    res = {"error": "export failed", "skipped": True}
                else:
                    res = run_job({**timing, "kind": "runtime", "runtime": runtime,
                                   "path": export["path"], "options": export.get("runner_options") or {},
                                   "count_int8_kernels": precision in INT8_PRECISIONS
                                   and n == threads[0]},
                                  work=work, timeout_s=timeout_s, threads=n)
            out["latency"].setdefault(key, {})[str(n)] = res
            log(f"[{component}]   " + (f"p50 {res['p50_ms']:.2f} ms, min {res['min_ms']:.2f} ms"
                                       if "error" not in res else f"FAILED: {res['error']}"))
    eager = out["latency"]["eager/fp32"][str(threads[0])]
    out["flops"] = eager.get("flops")
    out["macs"] = eager.get("macs")
    out["output_finite"] = eager.get("output_finite")
    if out["output_finite"] is False:
        log(f"[{component}] WARNING: the random-weight eager output is not finite; int8 calibration "
            "ranges are then meaningless")
    return out


def _describe_export(res: dict) -> str:
    if "error" in res:
        return f"FAILED: {res['error']}"
    text = f"{res['export_s']:.1f} s, {res['file_bytes'] / 1e6:.2f} MB, {res['precision']}"
    if "delegation" in res:
        d = res["delegation"]
        text += (f"; {d['ops_delegated']}/{d['ops_total']} ops in {d['delegates']} XNNPACK delegates, "
                 f"outside: {_ops_list(d['non_delegated_ops'])}")
    return text


def _ops_list(ops: dict, limit: int = 6) -> str:
    items = [f"{name.removeprefix('aten.').removesuffix('.default')} ×{n}" for name, n in ops.items()]
    return ", ".join(items[:limit]) + (f", … ({len(items) - limit} more)" if len(items) > limit else "") \
        if items else "none"


def ratio_threads(threads: list[int]) -> int:
    return 2 if 2 in threads else max(threads)


def p50(result: dict, key: str, threads: int) -> float | None:
    res = result["latency"].get(key, {}).get(str(threads), {})
    return res.get("p50_ms")


def peaks_of(key: str) -> tuple[str, ...]:
    """The XNNPACK peaks a row's floor may divide by (executorch/int8 follows the target's default;
    per_layer runs static and per-frame kernels, so the best of both)."""
    if key in ("executorch/int8", "executorch/int8-layer"):
        import targets.executorch

        scheme = targets.executorch.INT8_ACTIVATIONS_ON_XNNPACK if key == "executorch/int8" else "per_layer"
        return {"per_frame": ("int8-frame",), "static": ("int8-static",)}.get(scheme, ("int8-static", "int8-frame"))
    return (PEAK_OF[key],)


def floor_ms(result: dict, peaks: dict, key: str, threads: int) -> float | None:
    rates = [r for name in peaks_of(key) if (r := peak_gmacs(peaks, name, threads))]
    rate = max(rates) if rates else None
    if not result.get("macs") or not rate:
        return None
    return result["macs"] / (rate * 1e9) * 1e3


def _cell(value: float | None, fmt: str = "{:.1f}", missing: str = "—") -> str:
    return missing if value is None else fmt.format(value)


def _latency_cell(result: dict, key: str, threads: int) -> str:
    res = result["latency"].get(key, {}).get(str(threads), {})
    if "p50_ms" in res:
        return _fmt_ms(res["p50_ms"])
    return "timeout" if res.get("timeout") else "failed"


def _fmt_ms(ms: float) -> str:
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 0.1 else f"{ms:.4f}"


def component_label(result: dict) -> str:
    shapes = result["inputs"]
    if result["component"] == "denoiser":
        return f"denoiser `{result['preset']}` (x {'×'.join(map(str, shapes['x']))}, CFG batch 2)"
    return f"VAE decoder `{result['preset']}` (latent {'×'.join(map(str, shapes['latent']))}, 1 s audio)"


def build_table(results: list[dict], peaks: dict, threads: list[int]) -> str:
    rt = ratio_threads(threads)
    head = (["component", "runtime", "precision"] + [f"{n}t p50 ms" for n in threads]
            + [f"floor ms ({' / '.join(f'{n}t' for n in threads)})", f"× floor @{rt}t", f"× eager fp32 @{rt}t",
               "file MB", "export s", "ExecuTorch delegation"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for result in results:
        eager = p50(result, "eager/fp32", rt)
        for runtime, precision in VARIANTS:
            key = f"{runtime}/{precision}"
            floors = " / ".join("—" if (f := floor_ms(result, peaks, key, n)) is None else _fmt_ms(f)
                                for n in threads)
            floor_rt = floor_ms(result, peaks, key, rt)
            export = result["exports"].get(key, {})
            mine = p50(result, key, rt)
            ratio = f"{mine / eager:.2f}×" if mine is not None and eager else "—"
            over_floor = f"{mine / floor_rt:.2f}×" if mine is not None and floor_rt else "—"
            delegation = "—"
            if "delegation" in export:
                d = export["delegation"]
                delegation = f"{d['ops_delegated']}/{d['ops_total']} ops, {d['delegates']} delegates"
            cells = ([component_label(result), runtime, precision]
                     + [_latency_cell(result, key, n) for n in threads]
                     + [floors, over_floor, ratio,
                        _cell(export["file_bytes"] / 1e6, "{:.2f}") if "file_bytes" in export else "—",
                        _cell(export.get("export_s")) if runtime != "eager" else "—",
                        delegation])
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_profile(profile: dict) -> str:
    total = profile["method_execute_ms"] or (profile["delegate_calls_ms"] + profile["portable_calls_ms"])
    lines = [f"  per call (p50 over {profile['runs']} calls, {profile['threads']} thread(s)): "
             f"{total:.2f} ms; XNNPACK delegate calls {profile['delegate_calls_ms']:.2f} ms, "
             f"portable operator calls {profile['portable_calls_ms']:.2f} ms"]
    for row in profile["top"]:
        share = f"{100 * row['ms'] / total:.0f}%" if total else "?"
        lines.append(f"    {row['ms']:9.3f} ms {share:>4}  {row['where']:8s} {row['op']} (×{row['count']})")
    return "\n".join(lines)


def profile_summary(profile: dict, limit: int = 5) -> str:
    total = profile["method_execute_ms"] or (profile["delegate_calls_ms"] + profile["portable_calls_ms"])
    top = "; ".join(f"{r['op']} ({r['where']}, ×{r['count']}) {r['ms']:.2f} ms" for r in profile["top"][:limit])
    return (f"{total:.2f} ms per call, {profile['delegate_calls_ms']:.2f} ms in XNNPACK delegates and "
            f"{profile['portable_calls_ms']:.2f} ms in portable operators; top: {top}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(Path(argv[1]))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=("paper", "demo", "tiny"), default="paper",
                   help="SoftAlign denoiser preset (SOFTALIGN_PRESETS)")
    p.add_argument("--vae", choices=("sao", "demo", "tiny"), default="sao",
                   help="Oobleck preset of the VAE decoder (OOBLECK_PRESETS)")
    p.add_argument("--components", nargs="+", choices=COMPONENTS, default=list(COMPONENTS))
    p.add_argument("--runs", type=int, default=10, help="timed calls per measurement (p50 and min)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to measure")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds per subprocess (one export or one measurement) before it is killed")
    p.add_argument("--calib-n", type=int, default=4, help="random calibration inputs for int8")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs")
    p.add_argument("--peak-size", type=int, nargs=3, default=[1024, 2048, 2048],
                   metavar=("ROWS", "IN", "OUT"),
                   help="the exported Linear whose XNNPACK GEMM rate the floors divide by")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                   help="ETDump the ExecuTorch denoiser programs: auto = only when int8 is not faster "
                        "than eager fp32")
    p.add_argument("--out", type=Path, default=REPO / "out" / "quantized_latency",
                   help="results.json and table.md go here")
    p.add_argument("--keep-artifacts", action="store_true",
                   help="keep the exported files under OUT/artifacts (SAO size: ~1 GB) instead of a "
                        "temporary directory")
    p.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                   help="append the table to BENCHMARKS.md")
    a = p.parse_args(argv)
    if a.runs < 1 or a.warmup < 0 or any(n < 1 for n in a.threads):
        p.error("--runs must be ≥ 1, --warmup ≥ 0 and every --threads ≥ 1")
    a.threads = sorted(set(a.threads))
    t_start = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    presets = {"denoiser": a.config, "vae_decoder": a.vae}

    with tempfile.TemporaryDirectory(prefix="quantized-latency-") as tmp:
        work = Path(tmp)
        artifacts = a.out / "artifacts" if a.keep_artifacts else work / "artifacts"
        peaks = measure_peaks(rows=a.peak_size[0], in_features=a.peak_size[1],
                              out_features=a.peak_size[2], threads=a.threads,
                              precisions=["fp32", "int8-static", "int8-frame"], warmup=2, runs=5,
                              timeout_s=a.timeout, work=work / "peak")
        results = [measure_component(c, presets[c], seed=a.seed, calib_n=a.calib_n, threads=a.threads,
                                     warmup=a.warmup, runs=a.runs, timeout_s=a.timeout, work=work,
                                     artifacts=artifacts) for c in a.components]

        rt = ratio_threads(a.threads)
        verdict, profiles = None, {}
        den = next((r for r in results if r["component"] == "denoiser"), None)
        if den is not None:
            et_int8, eager = p50(den, "executorch/int8", rt), p50(den, "eager/fp32", rt)
            faster = et_int8 is not None and eager is not None and et_int8 < eager
            if et_int8 is None or eager is None:
                verdict = (f"ExecuTorch int8 denoiser vs eager fp32 at {rt} thread(s): not measured "
                           "(a run failed)")
            else:
                verdict = (f"ExecuTorch int8 denoiser {'IS' if faster else 'is NOT'} faster than eager "
                           f"fp32 at {rt} thread(s): {et_int8:.2f} ms vs {eager:.2f} ms "
                           f"({et_int8 / eager:.2f}×)")
            if a.profile == "always" or (a.profile == "auto" and not faster):
                for precision in ("int8", "fp32"):
                    export = den["exports"].get(f"executorch/{precision}", {})
                    if "path" not in export:
                        continue
                    log(f"[denoiser] ETDump profile of executorch {precision} at {rt} thread(s) ...")
                    profiles[precision] = run_job(
                        {"kind": "profile", "component": "denoiser", "preset": den["preset"],
                         "seed": a.seed, "path": export["path"], "threads": rt, "warmup": a.warmup,
                         "runs": a.runs, "top": TOP_OPS}, work=work, timeout_s=a.timeout, threads=rt)

    table = build_table(results, peaks, a.threads)
    peak_text = ", ".join(f"{precision} {n}t {rate:.1f}" if (rate := peak_gmacs(peaks, precision, n))
                          else f"{precision} {n}t failed"
                          for precision in peaks for n in a.threads)
    notes = [
        f"Random seeded weights (seed {a.seed}); {a.warmup} warm-up then {a.runs} timed calls per "
        "measurement, each in its own subprocess; p50 shown (min in the JSON). Denoiser: one call "
        "with both CFG branches (batch 2). VAE decoder: the latent of 1 s of audio "
        "(ceil(sample rate / downsampling) frames), so its ms are ms per second of audio. int8 = "
        "every Conv/ConvTranspose/Linear W8A8 with per-channel symmetric weights. ExecuTorch int8: "
        "int8 activations with one scale per latent frame computed at run time (Conv1d as time-major "
        "Linear, XNNPACK's dynamically quantized kernels; the target's default); int8-layer: per "
        "frame only where a layer alone keeps less than targets.executorch.SCHEME_THRESHOLD_DB of "
        "output SQNR under one calibrated scale per tensor, static elsewhere ('per_layer'); "
        "int8-static: every layer one calibrated scale per tensor, the static XNNPACK int8 kernels. "
        "ONNX int8: static QDQ. "
        f"Static scales calibrated on {a.calib_n} random inputs (t ~ U(0, 1)). ONNX Runtime through "
        "runtime_py's runner (CPU provider, at runtime_py verify's level: BASIC, or EXTENDED where the "
        "export found ORT integer kernels); ExecuTorch through its runner "
        "(XNNPACK threadpool reset to n before loading). "
        "ExecuTorch exports the whole graph (targets/xnnpack_graph.py passes). Floor = MACs of one "
        "call (toolkit.macs) / XNNPACK's best GEMM rate at the row's precision and thread count, "
        f"through ExecuTorch on one exported Linear {a.peak_size[0]}×{a.peak_size[1]}→{a.peak_size[2]} "
        f"(benchmarks/xnnpack_peak.py; GMAC/s: {peak_text}); ONNX rows share the XNNPACK floor. "
        f"× floor, × eager = p50 / floor or eager fp32 p50 at {rt} thread(s).",
    ]
    for r in results:
        if r.get("flops"):
            notes.append(f"{r['component']} `{r['preset']}`: {r['flops'] / 1e9:.2f} GFLOP per call "
                         f"(FlopCounterMode), {(r.get('macs') or 0) / 1e9:.2f} GMAC (toolkit.macs)"
                         + ("" if r.get("output_finite", True) else " (WARNING: eager output not finite)"))
        ort_int8 = r["latency"].get("onnx/int8", {}).get(str(a.threads[0]), {})
        if "ort_int8_kernels" in ort_int8:
            kernels = ort_int8["ort_int8_kernels"]
            notes.append(f"{r['component']} ONNX int8: integer kernels in ORT's session graph at "
                         f"{ort_int8.get('ort_level', 'ORT_ENABLE_BASIC')}: "
                         + (", ".join(f"{k} ×{v}" for k, v in kernels.items()) if kernels else
                            "none (Q/DQ on the weighted ops' inputs only run as dequantize + fp32 "
                            "Conv/MatMul on the CPU provider)"))
        for precision in ("fp32", *INT8_PRECISIONS):
            export = r["exports"].get(f"executorch/{precision}", {})
            if "delegation" in export:
                d = export["delegation"]
                notes.append(f"{r['component']} ExecuTorch {precision}: {d['ops_delegated']}/"
                             f"{d['ops_total']} ops in {d['delegates']} XNNPACK delegates; outside: "
                             f"{_ops_list(d['non_delegated_ops'], limit=8)}"
                             + (f"; {len(export['per_frame_layers'])} of {export['int8_layers']} int8 "
                                "layers per frame" + (f" ({', '.join(export['per_frame_layers'])})"
                                                      if export["per_frame_layers"] else "")
                                if "per_frame_layers" in export else ""))
    if verdict:
        notes.append(f"**{verdict}.**")
    for precision, profile in profiles.items():
        if "error" in profile:
            notes.append(f"ETDump profile of the ExecuTorch {precision} denoiser failed: {profile['error']}")
        else:
            notes.append(f"ETDump, ExecuTorch {precision} denoiser at {rt} thread(s): {profile_summary(profile)}")
    notes_text = "\n\n".join(notes)

    payload = {"command": _command(argv), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(a).items()},
               "wall_s": time.time() - t_start, "peaks": peaks, "results": results,
               "verdict": verdict, "profiles": profiles, "table": table}
    _write(a.out / "results.json", json.dumps(payload, indent=2))
    _write(a.out / "table.md", table + "\n\n" + notes_text + "\n")

    print(table)
    print()
    print(notes_text)
    if verdict:
        print(f"\n{verdict}")
    for precision, profile in profiles.items():
        if "error" in profile:
            print(f"\nETDump profile of the ExecuTorch {precision} denoiser failed: {profile['error']}; "
                  "delegation coverage above names the ops left outside XNNPACK")
        else:
            print(f"\nTop operators, ExecuTorch {precision} denoiser (ETDump):\n{format_profile(profile)}")
    if a.record:
        append_section("Quantized latency per component (eager vs ExecuTorch / ONNX Runtime, fp32 and W8A8)",
                       command=_command(argv), wall_s=time.time() - t_start, notes=notes_text, table=table)
    log(f"wrote {a.out / 'results.json'} ({time.time() - t_start:.0f} s)")
    return 0


def _command(argv: list[str]) -> str:
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return env + command_line(__file__, argv)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
