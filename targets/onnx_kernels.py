"""Which kernels ONNX Runtime's CPU provider really runs for a quantized ONNX graph, read from the
session's optimised graph (``SessionOptions.optimized_model_filepath``), never assumed.

At ORT_ENABLE_EXTENDED the CPU provider fuses a complete QDQ node unit (DQ on every input, Q on
the one output; ``targets.qdq_intents.INTEGER_KERNEL_EXTRA_OPTIONS``) into QLinearConv,
QLinearMatMul, QGemm or MatMulIntegerToFloat; at ORT_ENABLE_BASIC nothing is fused and the same
graph runs as DequantizeLinear + float32 kernels. ``runtime_py`` runs a graph whose report counts
integer nodes at the fusing level (``runtime_py.verify.runner_options``). The report
counts both, names per planned layer the op it became, and says why a weighted op stays float.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "MatMulInteger",
               "ConvInteger", "MatMulNBits")
FLOAT_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "FusedMatMul", "FusedConv",
                      "FusedGemm", "NchwcConv")
FUSING_LEVEL = "ORT_ENABLE_EXTENDED"  # the first level with QDQ fusions; ALL adds layout changes only

WHY_CONV_TRANSPOSE = "ConvTranspose: ORT's CPU provider has no QDQ selector (no integer kernel) for it"
WHY_GRAPH_OUTPUT = ("its output is the graph's output: ORT fuses no node unit that produces a graph "
                    "output, and the network's output stays float")
WHY_OUTPUT_FLOAT = ("its output Q/DQ was not kept: quantizing the output costs more than the limit "
                    "(quantization.output_selection), so ORT runs DequantizeLinear + fp32")
WHY_NOT_W8A8 = "not int8 weights and activations in the applied plan"
WHY_NOT_PLANNED = "not a plan layer (no constant weight: attention's activation x activation product)"


def _optimised(model, level: str):
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="adm-edge-ort-opt-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath), session


def _histogram(model, ops) -> dict[str, int]:
    counts = Counter(n.op_type for n in model.graph.node if n.op_type in ops)
    return dict(sorted(counts.items()))


def kernel_report(model, quantized, *, feeds: dict | None = None) -> dict:
    """What ORT's CPU provider runs for ``model`` (a quantized graph, ``targets.qdq.quantize_plan``'s
    ``quantized``) at ``FUSING_LEVEL``: integer and float op counts before and after, per planned
    layer the op each of its nodes became, and the reason every float weighted op stays float.
    ``feeds`` (one input per graph input): the fused session's output is compared with the
    unfused (ORT_ENABLE_BASIC) one's."""
    import numpy as np

    optimised, session = _optimised(model, FUSING_LEVEL)
    after = {n.name: n.op_type for n in optimised.graph.node}
    details = quantized.details
    outputs = (details.get("output_selection") or {}).get("nodes", {})
    graph_outputs = {o.name for o in model.graph.output}
    planned_nodes = {}
    layers = {}
    for layer, rows in details["nodes"].items():
        precision = quantized.applied[layer][0]
        w8a8 = (precision.weights, precision.activations) == ("int8", "int8")
        entries = []
        for row in rows:
            node = next(n for n in model.graph.node if n.name == row["node"])
            planned_nodes[node.name] = layer
            op = after.get(node.name, "fused away")
            entry = {"node": node.name, "op": row["op"], "runs_as": op}
            if op not in INTEGER_OPS:
                if not w8a8:
                    entry["why"] = WHY_NOT_W8A8
                elif row["op"] == "ConvTranspose":
                    entry["why"] = WHY_CONV_TRANSPOSE
                elif graph_outputs.intersection(node.output):
                    entry["why"] = WHY_GRAPH_OUTPUT
                elif outputs.get(node.name, {}).get("output") == "fp32":
                    entry["why"] = WHY_OUTPUT_FLOAT
                else:
                    entry["why"] = "not fused by ORT (complete node unit, unexplained)"
            entries.append(entry)
        layers[layer] = entries
    why = Counter(e["why"] for rows in layers.values() for e in rows if "why" in e
                  and e["why"] != WHY_NOT_W8A8)
    float_unplanned = [n for n in optimised.graph.node if n.op_type in FLOAT_WEIGHTED_OPS
                       and n.name not in planned_nodes]
    if float_unplanned:
        why[WHY_NOT_PLANNED] += len(float_unplanned)
    report = {
        "level": FUSING_LEVEL,
        "provider": "CPUExecutionProvider",
        "before": {"integer": _histogram(model, INTEGER_OPS),
                   "float": _histogram(model, FLOAT_WEIGHTED_OPS)},
        "after": {"integer": _histogram(optimised, INTEGER_OPS),
                  "float": _histogram(optimised, FLOAT_WEIGHTED_OPS),
                  "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in optimised.graph.node),
                  "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in optimised.graph.node)},
        "w8a8_nodes": sum(1 for rows in layers.values() for e in rows if "why" not in e or e["why"] != WHY_NOT_W8A8),
        "integer_nodes": sum(1 for rows in layers.values() for e in rows if e["runs_as"] in INTEGER_OPS),
        "why_float": dict(why.most_common()),
        "layers": layers,
        "runtime_py": (f"runtime_py runs this graph at {FUSING_LEVEL} when integer_nodes > 0 (the integer "
                       "kernels), else at ORT_ENABLE_BASIC (DequantizeLinear + float32 kernels)"),
    }
    if feeds is not None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        unfused = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        ref = np.concatenate([np.ravel(o).astype(np.float64) for o in unfused.run(None, feeds)])
        got = np.concatenate([np.ravel(o).astype(np.float64) for o in session.run(None, feeds)])
        noise = float(np.sum((ref - got) ** 2))
        report["fused_vs_unfused_sqnr_db"] = (None if noise == 0 else
                                              round(float(10 * np.log10(np.sum(ref ** 2) / noise)), 2))
        report["fused_vs_unfused_max_abs"] = float(np.max(np.abs(ref - got)))
    return report
