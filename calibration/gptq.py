"""GPTQ weight rounding (Frantar, Ashkboos, Hoefler, Alistarh, ICLR 2023), written from the paper.

Round-to-nearest (RTN) rounds every weight alone. GPTQ rounds the weights of one output row
column by column and moves each column's rounding error onto the columns not yet rounded, weighted
by the inverse Hessian of the layer's reconstruction loss, so that the layer's *output* on its
calibration inputs moves as little as the grid allows:

    argmin_Ŵ ‖W X − Ŵ X‖²₂                                                        (paper eq. 1)

with X the layer's inputs (one column per input vector). The loss is quadratic in each row with
Hessian H = 2 X Xᵀ, the same for every row. Greedy optimal-brain-quantization (OBQ) rounds one
weight q and updates the rest, δ_F = −(w_q − quant(w_q)) / [H_F⁻¹]_qq · (H_F⁻¹)_{:,q} (eq. 2), and
removes q from the inverse Hessian by one step of Gaussian elimination (eq. 3). GPTQ's three changes:
every row in the same (arbitrary) column order, so H⁻¹ is shared; lazy batch updates, applying a
block of B columns' updates to the rest of the matrix at once (eqs. 4, 5); and the Cholesky
reformulation: the rows of H⁻¹ that eq. 3 produces are those of the upper Cholesky factor of H⁻¹,
computed once, with dampening λ = percdamp · mean(diag H) added to H (1 % in the paper).

Algorithm 1, as implemented in :func:`gptq_quantize` (columns j, blocks of B, U = Cholesky(H⁻¹)ᵀ):

    for i = 0, B, 2B, ...
        for j = i .. i+B−1
            Q[:, j] ← quant(W[:, j])
            E[:, j−i] ← (W[:, j] − Q[:, j]) / U[j, j]
            W[:, j:i+B] ← W[:, j:i+B] − E[:, j−i] · U[j, j:i+B]
        W[:, i+B:] ← W[:, i+B:] − E · U[i:i+B, i+B:]

Here the grid is the project's (``calibration.fakequant``): symmetric, zero point 0, integers in
[−qmax, qmax] (qmax 127 for int8, 7 for int4), one scale per output channel (amax / qmax of the
float row, fixed before the loop), one for the whole tensor, or one per group of ``group_size``
consecutive columns, fixed when the loop reaches the group's first column (from the updated weights,
as GPTQ's grouping does). Scales are float32 values; the integers are exact for them.

Convolutions are the equivalent Linear over unfolded inputs (:func:`unfold_input`): a Conv1d's
output at one time step is W·x with W its weight as (out, in·k), in-channel-major, and x the k
dilated taps of every input channel stacked the same way (``F.unfold``); a ConvTranspose1d is the
Conv1d of its zero-stuffed input with the kernel flipped and in/out swapped. Conv2d likewise.
Grouped convolutions are not handled (none in the model families here).

Hessians come from one pass of the full-precision model over the PTQ4ADM calibration inputs of the
component (``calibration.feeds.calibration_feeds``, the same inputs the targets calibrate with),
through forward pre-hooks on every planned leaf, accumulated in float64. The paper quantizes
sequentially (later blocks see earlier blocks' quantized outputs); here every layer sees
full-precision inputs (as torchao's observe step does), one model pass for all layers.

Library implementations, tried on a tiny SoftAlign U-Net (torch 2.13 CPU, torchao 0.18,
neural-compressor 3.10; 27 Conv1d and 7 Linear leaves), before this module was written:

- torchao ``prototype.gptq.GPTQConfig``: with ``Int4WeightOnlyConfig`` the config itself raises
  ``ValueError: mslk is not installed. Please install mslk to use int4 quantization.``; with
  ``Int8WeightOnlyConfig(granularity=PerRow())`` the observe step runs and convert raises
  ``AssertionError: GPTQ only supports CUDA currently``. Its observer handles ``linear``/``bmm``
  only, so it would not see the Conv1d leaves either.
- neural-compressor ``GPTQConfig(bits=4, group_size=32, use_sym=True)`` through ``prepare``: it
  looks for transformer blocks, finds the ``upsample.0`` list as one, and then fails resolving the
  model as a Hugging Face hub model: ``huggingface_hub.errors.HFValidationError: Repo id must use
  alphanumeric chars, '-', '_' or '.'. ... : ''`` (``model_path`` unset). Its ``RTNConfig``
  quantizes the 7 Linear leaves and leaves all 27 Conv1d untouched. Neither fits a conv U-Net.

Cost, measured on the paper-size SoftAlign denoiser (15.4 M parameters, random weights; the 45
integer layers of the w4a8 preset, K up to 3072; 4 random inputs of the deployed batch; 2 threads
of the shared 2-core development machine, one forward 10.5 s there): Hessians 79 s, GPTQ 240 s at
int4 and 199 s more for the int8 fallback, round-to-nearest 11 s; the median int4 layer output
error was 0.30 of RTN's (a one-off timing, not recorded in BENCHMARKS.md).

The result of a rounding (:func:`round_plan`) is a safetensors file next to the plan, referenced
from the plan's ``rounding`` section with its sha256; for every planned integer layer it holds the
integers (int8 tensors in the module's weight layout) and scales at the plan's width and, for int4
layers, at int8 too, so that a target that can only apply int8 to a layer (no int4 convolution in
ONNX Runtime / TensorRT, no int4 transposed convolution on XNNPACK) receives GPTQ's int8 rounding,
not a fresh RTN. Targets read it through :func:`load_rounding`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_PERCDAMP = 0.01  # λ = 1 % of the mean diagonal of H (the paper's choice)
DEFAULT_BLOCK_SIZE = 128  # B: columns per lazy batch update (the paper's B = 128)
QMAX = {"int8": 127, "int4": 7}
FALLBACK_WIDTHS = {"int4": ("int8",)}  # widths a target may apply instead of the planned one
METHODS = ("rtn", "gptq")
FILE_SUFFIX = ".gptq.safetensors"
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.ConvTranspose1d, nn.Conv2d)


# --- convolutions as Linear layers --------------------------------------------------------------


def _check_layer(layer: nn.Module) -> None:
    if not isinstance(layer, LAYER_TYPES):
        raise TypeError(f"GPTQ rounds Linear, Conv1d, ConvTranspose1d and Conv2d layers, not {type(layer).__name__}")
    if isinstance(layer, (nn.Conv1d, nn.ConvTranspose1d, nn.Conv2d)):
        if layer.groups != 1:
            raise ValueError(f"{type(layer).__name__} with groups={layer.groups}: only ungrouped convolutions")
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"{type(layer).__name__}: only numeric zero padding can be unfolded")


def weight_as_linear(layer: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's weight as the (out, K) matrix of its equivalent Linear (see :func:`unfold_input`)."""
    _check_layer(layer)
    w = layer.weight.detach() if weight is None else weight
    if isinstance(layer, nn.ConvTranspose1d):  # (in, out, k) → flipped taps, (out, in, k)
        w = w.flip(-1).transpose(0, 1)
    return w.reshape(w.shape[0], -1)


def linear_as_weight(layer: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`weight_as_linear`: an (out, K) matrix in the layer's weight layout."""
    _check_layer(layer)
    if isinstance(layer, nn.ConvTranspose1d):
        in_ch, out_ch, k = layer.weight.shape
        return matrix.reshape(out_ch, in_ch, k).transpose(0, 1).flip(-1)
    return matrix.reshape(layer.weight.shape)


def channel_axis(layer: nn.Module) -> int:
    """The output-channel axis of the layer's weight (1 for a transposed convolution)."""
    return 1 if isinstance(layer, nn.ConvTranspose1d) else 0


def unfold_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of its equivalent Linear: (N, K) with ``layer(x)`` = rows · Wᵀ + b.

    Linear: every leading index is a row. Conv1d (B, C, T): ``F.unfold`` over (B, C, 1, T) with a
    (1, k) kernel, one row per output step, columns in-channel-major (c·k + j), matching
    ``weight.reshape(out, in·k)``. ConvTranspose1d (stride s, padding p, dilation d): the input with
    s − 1 zeros between steps, padded by d(k−1) − p (plus output_padding on the right), unfolded as a
    stride-1 Conv1d with the flipped, in/out-swapped kernel. Conv2d: ``F.unfold`` directly.
    """
    _check_layer(layer)
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                        stride=layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    k, d = layer.kernel_size[0], layer.dilation[0]
    if isinstance(layer, nn.ConvTranspose1d):
        s, p, op = layer.stride[0], layer.padding[0], layer.output_padding[0]
        edge = d * (k - 1) - p
        if edge < 0:
            raise ValueError(f"ConvTranspose1d with padding {p} > dilation·(kernel−1) cannot be unfolded")
        b, c, t = x.shape
        stuffed = x.new_zeros(b, c, (t - 1) * s + 1)
        stuffed[:, :, ::s] = x
        x = F.pad(stuffed, (edge, edge + op))
        stride, padding = 1, 0
    else:
        stride, padding = layer.stride[0], layer.padding[0]
    cols = F.unfold(x.unsqueeze(2), (1, k), dilation=(1, d), padding=(0, padding), stride=(1, stride))
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


# --- the grid and Algorithm 1 -------------------------------------------------------------------


def _scale(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """float32-representable symmetric scales (float64 values), never zero."""
    return (amax.clamp_min(1e-12) / qmax).float().double()


def _quant(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale), -qmax, qmax)


@dataclass(frozen=True)
class Rounded:
    """Integers and scales of one layer's weight in its (out, K) linear view.

    ``q``: int8 (out, K); ``scale``: float32 (out, groups), one column per group of ``group_size``
    columns (one group: per channel; ``per_tensor``: the same value in every row).
    """

    q: torch.Tensor
    scale: torch.Tensor
    weights: str
    group_size: int | None
    per_tensor: bool = False

    def scale_per_column(self) -> torch.Tensor:
        g = self.q.shape[1] if self.group_size is None else self.group_size
        return self.scale.repeat_interleave(g, dim=1)[:, : self.q.shape[1]]

    def dequantize(self) -> torch.Tensor:
        """Ŵ = q · s in the (out, K) view, float32 (exactly what a target's DequantizeLinear gives)."""
        return (self.q.double() * self.scale_per_column().double()).float()


def rtn_quantize(w: torch.Tensor, weights: str, *, group_size: int | None = None,
                 per_tensor: bool = False) -> Rounded:
    """Round-to-nearest on the same grid as :func:`gptq_quantize` (the baseline)."""
    return gptq_quantize(w, None, weights, group_size=group_size, per_tensor=per_tensor)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor | None, weights: str, *, group_size: int | None = None,
                  per_tensor: bool = False, percdamp: float = DEFAULT_PERCDAMP,
                  block_size: int = DEFAULT_BLOCK_SIZE) -> Rounded:
    """Algorithm 1 on an (out, K) weight with the (K, K) Hessian H = 2XXᵀ (eq. 1); ``hessian=None``
    is round-to-nearest (no error feedback) on the same grid."""
    if weights not in QMAX:
        raise ValueError(f"GPTQ rounds int8 or int4 weights, not {weights!r}")
    if group_size is not None and (group_size < 1 or per_tensor):
        raise ValueError("group_size must be positive and cannot be combined with per_tensor")
    qmax = QMAX[weights]
    W = w.detach().to(torch.float64).clone()
    rows, cols = W.shape
    gs = cols if group_size is None else group_size
    n_groups = math.ceil(cols / gs)
    if per_tensor:
        scale = _scale(W.abs().amax(), qmax).expand(rows, 1).clone()
    elif group_size is None:
        scale = _scale(W.abs().amax(dim=1, keepdim=True), qmax)
    else:
        scale = torch.zeros(rows, n_groups, dtype=torch.float64)  # fixed when the loop reaches a group
    Q = torch.zeros_like(W)

    if hessian is None:
        for g in range(n_groups):
            sl = slice(g * gs, min(cols, (g + 1) * gs))
            if group_size is not None:
                scale[:, g:g + 1] = _scale(W[:, sl].abs().amax(dim=1, keepdim=True), qmax)
            Q[:, sl] = _quant(W[:, sl], scale[:, g:g + 1] if not per_tensor and group_size is not None
                              else scale, qmax)
        return Rounded(Q.to(torch.int8), scale.float(), weights, group_size, per_tensor)

    H = hessian.detach().to(torch.float64).clone()
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian {tuple(H.shape)} does not match a weight with {cols} columns")
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    # Dampening (§4, "Cholesky reformulation"): λ = percdamp · mean diag H on the diagonal.
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    # The rows eq. 3 produces are those of the upper Cholesky factor of H⁻¹ (§4, Step 3).
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    for i in range(0, cols, block_size):  # lazy batch updates (§4, Step 2)
        j_end = min(i + block_size, cols)
        W1 = W[:, i:j_end].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        U1 = U[i:j_end, i:j_end]
        for jj in range(j_end - i):
            j = i + jj
            if group_size is not None and j % gs == 0:  # a new group: its scale from the updated weights
                g = j // gs
                span = W[:, j:min(cols, j + gs)].clone()
                span[:, : min(j_end, j + gs) - j] = W1[:, jj: jj + min(j_end, j + gs) - j]
                scale[:, g:g + 1] = _scale(span.abs().amax(dim=1, keepdim=True), qmax)
            s = scale[:, (j // gs if group_size is not None else 0)].unsqueeze(1)
            w_col = W1[:, jj:jj + 1]
            q_int = _quant(w_col, s, qmax)
            Q1[:, jj:jj + 1] = q_int
            # Eq. 2 / Algorithm 1: the column's error over its diagonal of the Cholesky factor ...
            err = (w_col - q_int * s) / U1[jj, jj]
            # ... moved onto the block's remaining columns.
            W1[:, jj:] -= err @ U1[jj:jj + 1, jj:]
            E1[:, jj:jj + 1] = err
        Q[:, i:j_end] = Q1
        # Eqs. 4 and 5: the whole block's errors applied to every later column at once.
        W[:, j_end:] -= E1 @ U[i:j_end, j_end:]
    return Rounded(Q.to(torch.int8), scale.float(), weights, group_size, per_tensor)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖WX − ŴX‖²_F = ½ tr(ΔW H ΔWᵀ) with H = 2XXᵀ (eq. 1's objective, from the Hessian alone)."""
    dw = (w.double() - w_hat.double())
    return float(0.5 * torch.einsum("ok,kl,ol->", dw, hessian.double(), dw))


# --- Hessians from calibration inputs -----------------------------------------------------------


@torch.no_grad()
def collect_hessians(model: nn.Module, feeds, layers: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """H = 2XXᵀ / N (float64) for every named leaf over ``model(*feed)`` for the feeds; and N.

    The 1/N keeps H's scale independent of the amount of data (it leaves GPTQ unchanged: the
    dampening is relative to diag H).
    """
    for layer in layers.values():
        _check_layer(layer)
    sums = {n: None for n in layers}
    counts = {n: 0 for n in layers}

    def hook(name, layer):
        def pre(module, inputs):
            x = unfold_input(layer, inputs[0].detach()).to(torch.float64)
            xtx = x.T @ x
            sums[name] = xtx if sums[name] is None else sums[name] + xtx
            counts[name] += x.shape[0]
        return pre

    from calibration.fakequant import run_hooked

    run_hooked(model, feeds, [m.register_forward_pre_hook(hook(n, m)) for n, m in layers.items()])
    missing = [n for n, c in counts.items() if c == 0]
    if missing:
        raise RuntimeError(f"no calibration input reached {missing[:5]}; they cannot be rounded with GPTQ")
    return {n: 2.0 * sums[n] / counts[n] for n in layers}, counts


# --- rounding a plan, the file, and reading it back -----------------------------------------------


@dataclass(frozen=True)
class LayerRounding:
    """What a target needs for one layer at one width: integers and scales in the layer's own
    weight layout. ``q``: int8 tensor shaped like the weight; ``scale``: float32, (out,) per
    channel or (out, groups) per group of ``group_size`` columns of the (out, K) view."""

    q: torch.Tensor
    scale: torch.Tensor
    weights: str
    group_size: int | None
    channel_axis: int

    def dequantize(self) -> torch.Tensor:
        """Ŵ in the weight layout (float32)."""
        q = self.q.movedim(self.channel_axis, 0)
        flat = q.reshape(q.shape[0], -1).double()
        s = self.scale.double()
        if s.dim() == 1:
            s = s[:, None]
        g = flat.shape[1] if self.group_size is None else self.group_size
        w = flat * s.repeat_interleave(g, dim=1)[:, : flat.shape[1]]
        return w.reshape(q.shape).movedim(0, self.channel_axis).float().contiguous()


def _to_layer_rounding(layer: nn.Module, r: Rounded) -> LayerRounding:
    q = linear_as_weight(layer, r.q).contiguous()
    scale = r.scale[:, 0].contiguous() if r.group_size is None else r.scale.contiguous()
    return LayerRounding(q, scale, r.weights, r.group_size, channel_axis(layer))


def round_layers(model: nn.Module, feeds, assignment: dict, *, method: str = "gptq",
                 group_size: int | None = None, percdamp: float = DEFAULT_PERCDAMP,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[dict[str, dict[str, LayerRounding]], dict]:
    """GPTQ (or RTN) of every integer-weight layer of ``assignment`` (FQN → LayerPrecision).

    Returns {FQN: {width: LayerRounding}} (the planned width and its fallbacks) and per-layer
    figures: the output error ‖WX − ŴX‖² (from H) of GPTQ and of RTN on the same grid, relative to
    ‖WX‖², and the calibration rows N. ``group_size`` applies to int4 layers; int8 is per channel.
    """
    if method not in METHODS:
        raise ValueError(f"rounding must be one of {METHODS}, got {method!r}")
    modules = dict(model.named_modules())
    todo = {}
    for name, prec in assignment.items():
        if prec.weights not in QMAX:
            continue
        if prec.granularity == "palette":
            raise ValueError(f"{name}: a palette (k-means look-up table) layer has no linear grid to round "
                             "onto with GPTQ; use per_channel granularity or --rounding rtn")
        todo[name] = modules[name]
    hessians, counts = collect_hessians(model, feeds, todo)
    out, figures = {}, {}
    for name, layer in todo.items():
        prec = assignment[name]
        w = weight_as_linear(layer).to(torch.float64)
        h = hessians[name]
        out[name] = {}
        for width in (prec.weights, *FALLBACK_WIDTHS.get(prec.weights, ())):
            gs = group_size if width == "int4" else None
            per_tensor = prec.granularity == "per_tensor"
            rtn = rtn_quantize(w, width, group_size=gs, per_tensor=per_tensor)
            chosen = rtn if method == "rtn" else gptq_quantize(
                w, h, width, group_size=gs, per_tensor=per_tensor, percdamp=percdamp, block_size=block_size)
            out[name][width] = _to_layer_rounding(layer, chosen)
            ref = max(output_error(w, torch.zeros_like(w), h), 1e-30)
            figures.setdefault(name, {"rows": counts[name]})[width] = {
                "relative_output_error_rtn": output_error(w, rtn.dequantize(), h) / ref,
                "relative_output_error": output_error(w, chosen.dequantize(), h) / ref}
    return out, figures


def _key(name: str, width: str, part: str) -> str:
    return f"{name}::{width}::{part}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_rounding(path: Path, roundings: dict[str, dict[str, LayerRounding]], *, component: str) -> str:
    """Write the rounding file (atomically); returns its sha256."""
    import os

    from toolkit.atomic import save_safetensors

    tensors, meta = {}, {}
    for name, widths in roundings.items():
        for width, r in widths.items():
            tensors[_key(name, width, "q")] = r.q.contiguous()
            tensors[_key(name, width, "scale")] = r.scale.contiguous()
            meta[f"{name}::{width}"] = {"group_size": r.group_size, "channel_axis": r.channel_axis}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_safetensors(tensors, tmp, metadata={"component": component, "layers": json.dumps(meta)})
    os.replace(tmp, path)
    return sha256_file(path)


def read_rounding(path: Path, *, sha256: str | None = None) -> dict[str, dict[str, LayerRounding]]:
    """The rounding file as {FQN: {width: LayerRounding}}; a sha256 mismatch is an error."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the plan's rounding file is missing (toolkit plan --rounding gptq "
                                "writes it next to the plan)")
    if sha256 is not None and sha256_file(path) != sha256:
        raise ValueError(f"{path}: sha256 differs from the plan's; the rounding file belongs to another plan")
    out: dict[str, dict[str, LayerRounding]] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["layers"])
        for key, info in meta.items():
            name, width = key.rsplit("::", 1)
            out.setdefault(name, {})[width] = LayerRounding(
                f.get_tensor(_key(name, width, "q")), f.get_tensor(_key(name, width, "scale")), width,
                info["group_size"], info["channel_axis"])
    return out


def load_rounding(plan: dict, component: str) -> dict[str, dict[str, LayerRounding]] | None:
    """The GPTQ rounding of ``component`` that ``plan`` references, or None (RTN: targets round)."""
    section = plan.get("rounding") or {"method": "rtn"}
    if section.get("method", "rtn") == "rtn":
        return None
    if section["method"] != "gptq":
        raise ValueError(f"unknown rounding method {section['method']!r} in the plan")
    entry = (section.get("components") or {}).get(component)
    if entry is None:
        return None
    return read_rounding(Path(entry["path"]), sha256=entry["sha256"])


def rounding_for(rounding: dict | None, name: str, width: str, *, target: str) -> LayerRounding | None:
    """The integers a target applies to layer ``name`` at ``width``; None when the plan has no
    rounding for the layer (RTN). A rounding without that width is an error, never a re-rounding."""
    if not rounding or name not in rounding:
        return None
    if width not in rounding[name]:
        raise ValueError(f"{target}: layer {name} is applied at {width}, but the plan's GPTQ rounding holds "
                         f"{sorted(rounding[name])} only; re-run toolkit plan --rounding gptq")
    return rounding[name][width]


def round_plan(pipeline, plan: dict, calib_dir: Path, plan_path: Path, *, components=("denoiser",),
               group_size: int | None = None, percdamp: float = DEFAULT_PERCDAMP,
               block_size: int = DEFAULT_BLOCK_SIZE, show_progress: bool = False) -> dict:
    """GPTQ-round the integer layers of ``plan``'s components; write ``<plan>.<component>.gptq.safetensors``
    next to ``plan_path``; return the plan's ``rounding`` section (files, hashes, settings, figures)."""
    from calibration.feeds import calibration_feeds
    from calibration.plan import component_assignment
    from toolkit.components import component_specs

    t0 = time.time()
    specs = component_specs(pipeline)
    section = {"method": "gptq", "paper": "Frantar et al. 2023, Algorithm 1", "percdamp": percdamp,
               "block_size": block_size, "int4_group_size": group_size, "calibration_set": str(calib_dir),
               "hessian_inputs": "full-precision model, one pass", "components": {}}
    for component in components:
        spec = specs[component]
        assign = component_assignment(plan, component, spec.module)
        if not assign or not any(p.weights in QMAX for p in assign.values()):
            continue
        feeds = calibration_feeds(pipeline, Path(calib_dir), component)
        roundings, figures = round_layers(spec.module, feeds, assign, group_size=group_size,
                                          percdamp=percdamp, block_size=block_size)
        path = Path(plan_path).with_name(f"{Path(plan_path).stem}.{component}{FILE_SUFFIX}")
        digest = write_rounding(path, roundings, component=component)
        section["components"][component] = {"file": path.name, "path": str(path.resolve()), "sha256": digest,
                                            "feeds": len(feeds), "layers": figures}
    section["seconds"] = round(time.time() - t0, 2)
    return section
