"""Compilation targets (executorch, coreml, tensorrt, onnx); one module each, listed in one table."""
