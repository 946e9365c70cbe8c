"""Graph surgery for TensorRT's ONNX parser: 1-D convolutions as 2-D (k × 1) convolutions.

Conv1d / ConvTranspose1d are rewritten between ``Unsqueeze(axis 3)`` and ``Squeeze(axis 3)``, the
form onnx-tensorrt's own Conv importer builds (see ``targets.tensorrt``'s module doc for why).
"""

from __future__ import annotations

_AXES_3 = "trt_axes_3"  # int64 [3]: the axis added to make 1-D convolutions 2-D


def _conv_rank(node, initializers: dict) -> int | None:
    """Spatial rank of a Conv/ConvTranspose node, from its weight or its kernel_shape."""
    from onnx import helper

    if node.input[1] in initializers:
        return len(initializers[node.input[1]].dims) - 2
    for attr in node.attribute:
        if attr.name == "kernel_shape":
            return len(helper.get_attribute_value(attr))
    return None


def _attrs_2d(node) -> dict:
    """The node's attributes with a trailing spatial dimension of size 1 added."""
    from onnx import helper

    attrs = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if attr.name in ("kernel_shape", "strides", "dilations", "output_shape"):
            value = [*value, 1]
        elif attr.name == "output_padding":
            value = [*value, 0]
        elif attr.name == "pads":  # [x1_begin, x1_end] -> [x1_begin, x2_begin, x1_end, x2_end]
            value = [value[0], 0, value[1], 0]
        attrs[attr.name] = value
    return attrs


def _copy(message, cls):
    copy = cls()
    copy.CopyFrom(message)
    return copy


def conv1d_as_conv2d(model):
    """Rewrite every 1-D Conv/ConvTranspose as 2-D with a (k×1) kernel. Returns (model, n)."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    weights_2d: dict[str, str] = {}
    nodes = []
    rewritten = 0
    for index, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "ConvTranspose") or _conv_rank(node, initializers) != 1:
            nodes.append(node)
            continue
        if node.input[1] not in initializers:
            raise ValueError(f"{node.name}: a 1-D convolution with a computed weight; TensorRT "
                             "needs constant weights (fold the weight before export)")
        tag = node.name or f"conv_{index}"
        x, w, *rest = node.input
        if w not in weights_2d:
            array = numpy_helper.to_array(initializers[w])
            weights_2d[w] = f"{w}__k1"
            graph.initializer.append(numpy_helper.from_array(array[..., None], weights_2d[w]))
        x4, y4 = f"{tag}__in4d", f"{tag}__out4d"
        nodes.append(helper.make_node("Unsqueeze", [x, _AXES_3], [x4], name=f"{tag}__unsqueeze"))
        nodes.append(helper.make_node(node.op_type, [x4, weights_2d[w], *rest], [y4], name=tag,
                                      domain=node.domain, **_attrs_2d(node)))
        nodes.append(helper.make_node("Squeeze", [y4, _AXES_3], list(node.output[:1]),
                                      name=f"{tag}__squeeze"))
        rewritten += 1
    if rewritten:
        import numpy as np

        graph.initializer.append(numpy_helper.from_array(np.array([3], dtype=np.int64), _AXES_3))
        used = {i for n in nodes for i in n.input}
        # Copy before clearing the repeated fields: their elements are views into the graph.
        new_nodes = [_copy(n, onnx.NodeProto) for n in nodes]
        kept = [_copy(i, onnx.TensorProto) for i in graph.initializer if i.name in used]
        del graph.node[:]
        graph.node.extend(new_nodes)
        del graph.initializer[:]
        graph.initializer.extend(kept)
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    return model, rewritten
