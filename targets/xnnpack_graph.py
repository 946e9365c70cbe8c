"""Edge-dialect graph passes that keep a whole component inside XNNPACK (executorch 1.5.1).

What XNNPACK takes is what its partitioner configs claim
(``executorch/backends/xnnpack/partition/config/__init__.py``, ``ALL_PARTITIONER_CONFIGS``); in
the installed 1.5.1 no config claims ``native_group_norm``, ``expand_copy``,
``split_with_sizes_copy``, ``index.Tensor`` or ``arange``, ``mean.dim`` is taken only for a 4-D
input averaged over dims [2, 3] with keepdim, ``_to_dim_order_copy`` only without a dtype change,
``unsqueeze_copy`` only on the trailing dimension, ``slice_copy`` only with step 1, and ``cat``
only over two or more *distinct* input nodes. Every op left outside runs on a portable kernel
and cuts the graph into separate delegates with copies between them (BENCHMARKS.md: the
``paper`` denoiser was 40 delegates). The passes here rewrite those ops, after ``to_edge`` and
before partitioning, into ones XNNPACK claims, computing the same values:

| op outside XNNPACK                          | rewritten as                                          |
| ------------------------------------------- | ----------------------------------------------------- |
| ``native_group_norm`` (GroupNorm)            | view (N, G, C/G, T) → mean.dim([2, 3], keepdim) → sub |
|                                             | → mean of squares → add ε → rsqrt → mul → affine with |
|                                             | weight and bias folded to (1, G, C/G, 1) constants →   |
|                                             | view back                                             |
| ``split_with_sizes_copy`` / ``split_copy``  | one ``slice_copy`` (step 1) per used output (chunk)    |
| ``expand_copy`` to its own shape            | removed (matmul's decomposition emits them)           |
| ``expand_copy`` read only by broadcasting   | removed: XNNPACK's binary ops broadcast               |
| add / sub / mul / div / maximum / minimum    |                                                       |
| ``index.Tensor`` with a constant index      | s trailing ``unsqueeze_copy`` → ``cat`` → view        |
| ``arange(n·s) // s`` on the last dim         | (nearest-neighbour upsampling by s, F.interpolate)    |
| ops on constants only (``arange`` of the     | folded into constants (executorch's                   |
| timestep embedding, scalar constants cast    | ``constant_prop_pass``; quantize / dequantize ops are |
| by ``_to_dim_order_copy``)                   | never folded, so int8 weights stay int8)              |
| ``_clone_dim_order`` / ``_to_dim_order_copy`` | removed: every edge op writes a contiguous tensor     |
| of a contiguous tensor, same dtype           |                                                       |
| a static ``dequantize_per_tensor`` read by   | one copy per reader, so the node groups of XNNPACK's  |
| several ops (int8 graphs)                   | partitioner do not overlap (else: "Invalid partition, |
|                                             | found dependency cycles")                             |

Each pass counts what it rewrote; :func:`whole_graph_passes` returns the pass manager for
``to_edge_transform_and_lower(transform_passes=...)`` and a dict that fills with those counts
(``details["graph_passes"]`` of an ExecuTorch artifact). A pattern the passes do not recognise
(a GroupNorm whose mean or rstd outputs are used, an expand that must materialise) is left as it
was and shows up in the delegation record's ``non_delegated_ops``; nothing is dropped silently.
"""

from __future__ import annotations

import operator
from collections import Counter

# Elementwise binary ops of the edge dialect that broadcast their operands inside XNNPACK.
_BROADCASTING = ("aten.add.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.div.Tensor",
                 "aten.maximum.default", "aten.minimum.default")


def _edge(name: str):
    """The edge-dialect op ``aten.<name>`` (e.g. 'view_copy.default')."""
    from executorch.exir.dialects._ops import ops as exir_ops

    packet, overload = name.split(".")
    return getattr(getattr(exir_ops.edge.aten, packet), overload)


def _name(target) -> str:
    return str(getattr(target, "__name__", target))


def _val(node):
    return node.meta.get("val") if hasattr(node, "meta") else None


def _emit(graph, target, args: tuple, kwargs: dict | None = None, *, like):
    """A new call_function node with ``meta['val']`` computed on the fake values of its inputs.

    ``like`` lends its module stack and source (where the op came from), so delegation and
    quantization reports still attribute the new node to the layer it replaces.
    """
    import torch
    from torch._guards import detect_fake_mode
    from torch.utils import _pytree as pytree

    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    fake_args, fake_kwargs = pytree.tree_map(
        lambda a: _val(a) if isinstance(a, torch.fx.Node) else a, (args, kwargs))
    mode = detect_fake_mode(pytree.tree_leaves((fake_args, fake_kwargs)))
    with torch.no_grad():
        if mode is None:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
        else:
            with mode:
                node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


def _getitem_users(node) -> dict[int, list]:
    """index → getitem nodes reading that output of a multi-output node; None if another use."""
    out: dict[int, list] = {}
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            return None
        out.setdefault(user.args[1], []).append(user)
    return out


def _result(graph_module, changed: bool):
    from torch.fx.passes.infra.pass_base import PassResult

    if changed:
        graph_module.graph.eliminate_dead_code()
        graph_module.graph.lint()
        graph_module.recompile()
    return PassResult(graph_module, changed)


# ---------------------------------------------------------------------------------------------
# GroupNorm
# ---------------------------------------------------------------------------------------------


def group_norm_reference(x, groups: int, weight, bias, eps: float):
    """GroupNorm in exactly the ops :func:`decompose_group_norm` emits, as eager torch.

    x (N, C, *spatial) is viewed as (N, G, C/G, T); mean and variance (a mean of squares of the
    centred values, not E[x²] − E[x]², which cancels badly) over the last two dims with keepdim,
    as XNNPACK's mean takes them; the affine parameters are shaped (1, G, C/G, 1) so that they
    broadcast inside the delegate with no unsqueeze or expand.
    """
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, c // groups, -1)
    centred = xg - xg.mean(dim=[2, 3], keepdim=True)
    var = (centred * centred).mean(dim=[2, 3], keepdim=True)
    y = centred * (var + eps).rsqrt()
    if weight is not None:
        y = y * weight.reshape(1, groups, c // groups, 1)
    if bias is not None:
        y = y + bias.reshape(1, groups, c // groups, 1)
    return y.reshape(x.shape)


def decompose_group_norm(graph_module, counts: Counter | None = None):
    """``native_group_norm`` → the ops of :func:`group_norm_reference` (edge dialect)."""
    graph = graph_module.graph
    view, mean, sub = _edge("view_copy.default"), _edge("mean.dim"), _edge("sub.Tensor")
    mul, add, rsqrt = _edge("mul.Tensor"), _edge("add.Tensor"), _edge("rsqrt.default")
    scalar = _edge("scalar_tensor.default")
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or _name(node.target) != "aten.native_group_norm.default":
            continue
        users = _getitem_users(node)
        if users is None or set(users) - {0}:
            if counts is not None:
                counts["group_norm_kept (mean or rstd used)"] += 1
            continue  # its statistics are read: leave it (it shows up outside the delegate)
        x, weight, bias, n, c, hxw, groups, eps = node.args
        shape = list(_val(x).shape)
        grouped = [n, groups, c // groups, hxw]
        affine = [1, groups, c // groups, 1]
        with graph.inserting_before(node):
            xg = _emit(graph, view, (x, grouped), like=node)
            centred = _emit(graph, sub, (xg, _emit(graph, mean, (xg, [2, 3], True), like=node)),
                            like=node)
            square = _emit(graph, mul, (centred, centred), like=node)
            var = _emit(graph, mean, (square, [2, 3], True), like=node)
            # ε as a 0-d tensor (the edge verifier refuses a Python float for add.Tensor's other);
            # whole_graph_passes' last constant fold turns it into a constant.
            eps_t = _emit(graph, scalar, (float(eps),), {"dtype": _val(x).dtype}, like=node)
            rstd = _emit(graph, rsqrt, (_emit(graph, add, (var, eps_t), like=node),), like=node)
            y = _emit(graph, mul, (centred, rstd), like=node)
            if weight is not None:
                y = _emit(graph, mul, (y, _emit(graph, view, (weight, affine), like=node)), like=node)
            if bias is not None:
                y = _emit(graph, add, (y, _emit(graph, view, (bias, affine), like=node)), like=node)
            y = _emit(graph, view, (y, shape), like=node)
        for getitem in users.get(0, []):
            getitem.replace_all_uses_with(y)
            graph.erase_node(getitem)
        graph.erase_node(node)
        changed = True
        if counts is not None:
            counts["group_norm_decomposed"] += 1
    return _result(graph_module, changed)


# ---------------------------------------------------------------------------------------------
# split → slices, expands, nearest-neighbour upsampling
# ---------------------------------------------------------------------------------------------


def split_to_slices(graph_module, counts: Counter | None = None):
    """``split_with_sizes_copy`` / ``split_copy`` → one ``slice_copy`` per output that is read."""
    graph = graph_module.graph
    slice_copy = _edge("slice_copy.Tensor")
    changed = False
    for node in list(graph.nodes):
        name = _name(node.target) if node.op == "call_function" else ""
        if name not in ("aten.split_with_sizes_copy.default", "aten.split_copy.Tensor"):
            continue
        users = _getitem_users(node)
        if users is None:
            continue
        x, sizes = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        length = _val(x).shape[dim]
        if isinstance(sizes, int):  # split_copy: equal chunks, the last may be shorter
            sizes = [min(sizes, length - s) for s in range(0, length, sizes)]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        for index, getitems in users.items():
            with graph.inserting_before(getitems[0]):
                piece = _emit(graph, slice_copy, (x, dim, starts[index], starts[index] + sizes[index], 1),
                              like=node)
            for getitem in getitems:
                getitem.replace_all_uses_with(piece)
                graph.erase_node(getitem)
        graph.erase_node(node)
        changed = True
        if counts is not None:
            counts["split_to_slices"] += 1
    return _result(graph_module, changed)


def _broadcast_shape(*shapes):
    import torch

    return tuple(torch.broadcast_shapes(*shapes))


def fold_expands(graph_module, counts: Counter | None = None):
    """Remove ``expand_copy`` nodes that copy nothing XNNPACK needs.

    An expand to its own shape is an identity (``q @ k.T`` on 4-D tensors decomposes into
    expand → view → bmm with such expands). An expand read only by broadcasting binary ops whose
    output shape is the same without it is folded into them: XNNPACK broadcasts.
    """
    graph = graph_module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or _name(node.target) != "aten.expand_copy.default":
            continue
        src = node.args[0]
        src_val, out_val = _val(src), _val(node)
        if src_val is None or out_val is None or src_val.dtype != out_val.dtype:
            continue
        if tuple(src_val.shape) == tuple(out_val.shape):
            kind = "expand_noop_removed"
        elif node.users and all(u.op == "call_function" and _name(u.target) in _BROADCASTING
                                for u in node.users) and _all_users_broadcast_to_same(node, src_val):
            kind = "expand_folded_into_broadcast"
        else:
            continue
        node.replace_all_uses_with(src)
        graph.erase_node(node)
        changed = True
        if counts is not None:
            counts[kind] += 1
    return _result(graph_module, changed)


def _all_users_broadcast_to_same(node, src_val) -> bool:
    for user in node.users:
        shapes = [tuple(src_val.shape) if a is node else tuple(_val(a).shape)
                  for a in user.args[:2] if hasattr(a, "meta")]
        try:
            if _broadcast_shape(*shapes) != tuple(_val(user).shape):
                return False
        except RuntimeError:
            return False
    return True


def drop_identity_copies(graph_module, counts: Counter | None = None):
    """Remove contiguous-copy nodes (``_clone_dim_order`` / ``_to_dim_order_copy``) that copy
    nothing: same dtype, contiguous input, default dim order.

    In the edge dialect ``permute_copy`` (and every other op) writes a new contiguous tensor, so
    the clone that ``.contiguous()`` / ``reshape`` of a transposed tensor records copies nothing;
    a partition left holding only such a clone passes its input straight through, which the
    delegate refuses ("Output node ... is already in the inputs").
    """
    graph = graph_module.graph
    changed = False
    for node in list(graph.nodes):
        name = _name(node.target) if node.op == "call_function" else ""
        if name not in ("dim_order_ops._clone_dim_order.default",
                        "dim_order_ops._to_dim_order_copy.default"):
            continue
        src = node.args[0]
        val, out = _val(src), _val(node)
        if val is None or out is None or not hasattr(val, "dim") or val.dtype != out.dtype:
            continue
        if not val.is_contiguous():
            continue
        if list(node.kwargs.get("dim_order") or range(val.dim())) != list(range(val.dim())):
            continue
        node.replace_all_uses_with(src)
        graph.erase_node(node)
        changed = True
        if counts is not None:
            counts["identity_copy_removed"] += 1
    return _result(graph_module, changed)


def duplicate_shared_dequants(graph_module, counts: Counter | None = None):
    """Give every reader of a static ``dequantize_per_tensor`` its own copy of it.

    XNNPACK folds a dequantize into the quantized op that reads it (an "implicit" dq: the op
    reads the int8 tensor). A dq read by both a quantized op and a float one (a residual add's
    input that is also a GroupNorm's input) is then claimed by two node groups at once, and the
    partitions built from those groups depend on each other both ways ("Invalid partition,
    found dependency cycles"). One dq per reader: the quantized reader folds its own, the float
    reader gets an explicit int8 → float convert, and the groups no longer overlap.
    """
    graph = graph_module.graph
    changed = False
    for node in list(graph.nodes):
        if (node.op != "call_function"
                or _name(node.target) != "quantized_decomposed.dequantize_per_tensor.default"
                or len(node.users) < 2):
            continue
        for user in list(node.users)[1:]:
            with graph.inserting_before(user):
                copy = graph.call_function(node.target, node.args, dict(node.kwargs))
            copy.meta = dict(node.meta)
            user.replace_input_with(node, copy)
            changed = True
            if counts is not None:
                counts["dequantize_duplicated"] += 1
    return _result(graph_module, changed)


def _program_pass(run, counts: Counter):
    """An executorch ExportedProgramPassBase around ``run(exported_program, counts) -> changed``,
    for the passes that need the program's constants, not only its graph."""
    from executorch.exir.pass_base import (
        ExportedProgramPassBase,
        ExportedProgramPassResult,
    )

    class ProgramPass(ExportedProgramPassBase):
        def call(self, exported_program):
            changed = run(exported_program, counts)
            if changed:
                exported_program.graph_module.graph.eliminate_dead_code()
                exported_program.graph_module.recompile()
            return ExportedProgramPassResult(exported_program, changed)

    ProgramPass.__name__ = ProgramPass.__qualname__ = run.__name__
    return ProgramPass()


def nearest_upsample_as_cat(exported_program, counts: Counter) -> bool:
    """``index.Tensor(x, [None, …, idx])`` with constant idx = arange(L·s) // s on x's last dim
    (what nearest-neighbour ``F.interpolate`` by an integer factor s becomes) → s
    ``unsqueeze_copy(x, -1)`` → ``cat(dim=-1)`` → view to (…, L·s). One unsqueeze node per copy:
    XNNPACK's cat wants distinct input nodes."""
    import torch
    from executorch.exir.passes.constant_prop_pass import get_constant_placeholder_dict

    constants = get_constant_placeholder_dict(exported_program)
    graph = exported_program.graph_module.graph
    unsqueeze, cat, view = (_edge("unsqueeze_copy.default"), _edge("cat.default"),
                            _edge("view_copy.default"))
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or _name(node.target) != "aten.index.Tensor":
            continue
        x, indices = node.args
        rank = _val(x).dim()
        if len(indices) != rank or any(i is not None for i in indices[:-1]):
            continue
        idx = constants.get(indices[-1])
        length = _val(x).shape[-1]
        if idx is None or idx.dim() != 1 or idx.numel() % length:
            continue
        s = idx.numel() // length
        if not torch.equal(idx.to(torch.int64), torch.arange(idx.numel()) // s):
            continue
        with graph.inserting_before(node):
            copies = [_emit(graph, unsqueeze, (x, -1), like=node) for _ in range(s)]
            y = copies[0] if s == 1 else _emit(graph, cat, (copies, -1), like=node)
            y = _emit(graph, view, (y, list(_val(node).shape)), like=node)
        node.replace_all_uses_with(y)
        graph.erase_node(node)
        changed = True
        counts["nearest_upsample_as_cat"] += 1
    return changed


def fold_constants(exported_program, counts: Counter) -> bool:
    """executorch's ``constant_prop_pass`` (skips quantize / dequantize, so int8 stays int8)."""
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    before = sum(1 for n in exported_program.graph.nodes if n.op == "call_function")
    if constant_prop_pass(exported_program) is not exported_program:
        raise RuntimeError("executorch's constant_prop_pass no longer folds in place (it did in 1.5.1); "
                           "targets.xnnpack_graph.fold_constants must return its new program")
    after = sum(1 for n in exported_program.graph.nodes if n.op == "call_function")
    counts["ops_folded_into_constants"] += before - after
    return after != before


def whole_graph_passes(counts: Counter | None = None):
    """(pass manager for ``to_edge_transform_and_lower(transform_passes=...)``, counts).

    ``counts`` fills, as the passes run, with what each rewrote (see the module doc).
    """
    from functools import partial

    from executorch.exir.pass_manager import ExportedProgramPassManager

    counts = Counter() if counts is None else counts
    passes = [
        _program_pass(fold_constants, counts),  # arange / scalar casts → constants
        _program_pass(nearest_upsample_as_cat, counts),  # reads the folded index constants
        partial(decompose_group_norm, counts=counts),
        partial(split_to_slices, counts=counts),
        partial(fold_expands, counts=counts),
        partial(drop_identity_copies, counts=counts),
        partial(duplicate_shared_dequants, counts=counts),
        _program_pass(fold_constants, counts),  # GroupNorm affine views of weights → constants
    ]
    return ExportedProgramPassManager(passes), counts
