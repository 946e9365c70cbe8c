#!/usr/bin/env python3
"""Build the TensorRT engines of this bundle on a machine with an NVIDIA GPU.

Copied into every TensorRT bundle by adm-edge (``targets/build_engines.py``); it reads the
components from ``engines.json`` beside it. Needs the `tensorrt` Python package matching the GPU
machine's driver. Engines are tied to the GPU model and TensorRT version that built them.

    python build_engines.py              # every component, at the precision it was exported for
    python build_engines.py --no-fp16    # force float32 engines (Q/DQ graphs: always as typed)
    python build_engines.py --only denoiser
"""

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENGINES_FILE = "engines.json"  # [{"component", "onnx", "plan", "fp16", "qdq"}], written at export
WORKSPACE_GIB = 4.0


def build_engine(onnx_path, plan_path, *, fp16, qdq=False, workspace_gib=4.0):
    """Parse ``onnx_path`` with TensorRT's ONNX parser and write the serialized engine to
    ``plan_path`` (via a temporary file). Needs ``tensorrt`` and a CUDA GPU.

    ``qdq``: the graph carries Q/DQ nodes (explicit quantization). It is built as a strongly typed
    network, without precision flags, as TensorRT documents for Q/DQ networks (TensorRT 11 removes
    the INT8/FP16 builder flags); a TensorRT without strong typing (8.x) gets BuilderFlag.INT8,
    which Q/DQ networks need there. ``fp16`` does not apply to them: float layers keep the ONNX
    types."""
    import os
    from pathlib import Path

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if qdq and fp16:
        raise ValueError(f"{onnx_path.name} has Q/DQ nodes: its engine is built from the graph's own "
                         "types (explicit quantization), so fp16 does not apply; build it without --fp16")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # TensorRT 10 networks are always explicit-batch
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    strongly_typed = qdq and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if qdq and not strongly_typed:
        config.set_flag(trt.BuilderFlag.INT8)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} (see the log)")
    tmp = plan_path.with_name(f".{plan_path.name}.tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, plan_path)
    return plan_path


def main(argv=None):
    components = json.loads((HERE / ENGINES_FILE).read_text())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None,
                        help="TensorRT BuilderFlag.FP16: faster, less exact; default: the "
                             "precision each component was exported for")
    parser.add_argument("--workspace-gib", type=float, default=WORKSPACE_GIB,
                        help="builder workspace memory pool limit (GiB)")
    parser.add_argument("--only", action="append", choices=[c["component"] for c in components],
                        help="build only this component (repeatable)")
    args = parser.parse_args(argv)
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"build_engines.py needs the tensorrt Python package ({exc}); "
                         "install the one matching this machine's CUDA driver") from None
    for entry in components:
        if args.only and entry["component"] not in args.only:
            continue
        fp16 = entry["fp16"] if args.fp16 is None else args.fp16
        plan = build_engine(HERE / entry["onnx"], HERE / entry["plan"], fp16=fp16,
                            qdq=entry["qdq"], workspace_gib=args.workspace_gib)
        kind = "Q/DQ, strongly typed" if entry["qdq"] else ("fp16" if fp16 else "fp32")
        print(f"{entry['component']}: {plan.name} ({kind})")


if __name__ == "__main__":
    main()
