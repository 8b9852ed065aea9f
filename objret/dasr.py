"""Deeply activated salient regions: DASR and DASR* (001 sec. III).

1. A forward pass gives the target layer's map X (stride 32 by default); its channel mean X̄ signals objects.
2. Peaks of X̄: DASR* takes every position above the mean of X̄ (sec. III-B), DASR the 3x3 local maxima.
3. Each peak's "top neuron" (the channel mean at that position) gets probability 1, and the probability is
   back-propagated layer by layer with the excitation-backprop rule (eq. 2-3, Zhang et al. 2016/2018):

       P(A_x) = sum_j P(A_x | B_j) P(B_j),   P(A_x | B_j) = Z_j A_x F_xj  for A_x F_xj > 0 (0 otherwise)

   i.e. a winner B_j hands its probability to the inputs that excite it, in proportion to their share of its
   excitation (Z_j normalises the shares to 1; biases take no share).
4. The probability map M at the stopping layer (summed over channels, normalised to [0, 1]) is thresholded at
   tau, an ellipse is fitted from the second moments of the kept positions (eq. 4) and its circumscribed
   rectangle is the region's box.
5. DASR* keeps the regions by non-maximum suppression at IoU beta (0.3), in order of their peak's X̄ value.

How the rule meets each layer type (realised with autograd: custom backward functions installed by a
TorchFunctionMode, so that ``torch.autograd.grad`` carries probabilities instead of gradients):

* convolution (dense, depthwise = grouped, strided, padded): eq. 3 per output position; BatchNorm is folded
  into the convolution first, so its per-channel scale is part of F (a negative scale flips which weights are
  positive) and its shift is a bias, which takes no share. Where a layer's input can be negative (EfficientNet's
  linear bottlenecks, residual sums, the normalised image), "A_x F_xj > 0" is read as "the contribution has
  the sign of the output B_j": the inputs that pushed B_j where it is share its probability. For non-negative
  inputs and positive outputs (every conv+BN+ReLU) this is eq. 3 exactly.
* ReLU, ReLU6: probabilities pass through unchanged (a zero output gets none from the next layer anyway; a
  ReLU6 saturated at 6 is still a winner, where its gradient would block it).
* residual addition: the sum's probability is split in proportion to the two terms' contributions (same sign
  rule), so mass is conserved rather than copied to both branches.
* max and average pooling: a convolution with all-one weights within each channel (sec. III-A: no "blanks"
  that max-pooling's gradient would leave).
* anything else that would scale probabilities (BatchNorm left unfolded, multiplicative gates such as
  squeeze-excitation, SiLU/hardswish, linear layers) raises ObjretError: the three backbones have none of them.

Stopping layer: ``to_layer="stride8"`` by default (the last stride-8 block's output). The paper goes down to
the input pixels; we stop earlier because (a) the normalised image is signed, so the first convolution would
need the signed reading of eq. 3 rather than eq. 3 itself, (b) the layers below stride 8 run at 4-16x the
positions and would be the most expensive part of every peak's backward pass, and (c) going further down did
not give better boxes: on 60 coco_mini images at 320 px (efficientnet_lite0), the mean best IoU of the objects
covering >= 5% of the image was 0.38 (stride16), 0.38 (stride8), 0.38 (stride4) and 0.40 vs 0.40 for
"input" vs stride8 on the first 30 images. A stride-8 map (80 x 60 positions for a 640 px frame) is four times
finer than the stride-32 peaks, enough for a box. "stride16" is as accurate there and about 3x cheaper;
"stride4" and "input" are available.

Threshold: tau = 0.2 by default, where the paper uses 0.1: on the same 60 images at stride 8, 0.2 gave a mean
best IoU of 0.38 vs 0.37 for large objects and 0.13 vs 0.10 for objects of 1-5% of the image (0.1 keeps a
wide halo of low probability around the peak, so boxes grow and NMS keeps fewer of them).

Probability mass: for EfficientNet-Lite only ~5-15% of a peak's unit reaches stride 8. The rest sits on
depthwise channels whose folded kernel has no positive weight and which fire through their bias alone (277 of
1152 channels in lite0's last block): eq. 3 gives such winners no input to pass their probability to. Maps
are normalised to their maximum, so this only means those paths carry no evidence. ResNet-50 conserves ~100%.

Batching: the layers below the stopping layer run once per image. The peaks of one image share all
activations, so the layers above run on the image's stopping-layer map expanded (stride 0) to one row per
peak: every layer computes its forward once and only the probabilities have one row per peak. One backward
pass per ``chunk_size`` peaks of an image, never one per peak.

Cost: each peak costs about one backward pass of the layers above the stopping layer, so a frame costs
peaks x that, and both grow with the frame's area. Measured once on the shared 2-core CPU (1 thread), batch of
8 coco_mini frames at 640 x 480, 64 of ~150 above-mean peaks per frame: lite0 stride8 18 s per frame, lite2
stride8 25 s, lite2 stride16 8.6 s (a plain forward pass: 0.4-0.6 s). At 320 px lite0 takes ~1.5 s per frame.
"""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from objret.errors import ObjretError

STOP_LAYERS = ("input", "stride4", "stride8", "stride16")
_EPS = 1e-12


@dataclass(frozen=True)
class Region:
    """One salient region: box (x, y, w, h) in pixels of the network input, its peak and the peak's X̄ value."""

    box: tuple[float, float, float, float]
    score: float
    peak: tuple[int, int]  # (row, col) on the target layer's map
    mass: float            # probability that reached the stopping layer (1 minus what biases absorbed)


# ---------------------------------------------------------------------------------------------------------------
# The probabilistic back-propagation rule (eq. 2-3)
# ---------------------------------------------------------------------------------------------------------------

def _inverse(total: torch.Tensor) -> torch.Tensor:
    """Z_j of eq. 3: 1 / (excitation of B_j), 0 where nothing excites B_j (its probability is then lost: only a
    bias made it fire, and biases take no share)."""
    return torch.where(total > _EPS, 1.0 / total.clamp(min=_EPS), torch.zeros_like(total))


def _shared_rows(*tensors):
    """Peaks of one image share their activations: the input is the image's map expanded (stride 0) to one row
    per peak. Layers then compute on one row and return it expanded, and only the probabilities (backward)
    have one row per peak. Returns (one-row tensors, rows) or (tensors, None) for ordinary batches."""
    first = tensors[0]
    if first.dim() and first.shape[0] > 1 and all(t.shape[0] == first.shape[0] and t.stride(0) == 0
                                                   for t in tensors):
        return [t[:1] for t in tensors], first.shape[0]
    return list(tensors), None


def _expand(t: torch.Tensor, rows: int | None) -> torch.Tensor:
    return t.expand(rows, *t.shape[1:]) if rows else t


def _linear_rule(x, weight, out, p_out, forward, transpose):
    """Eq. 2-3 for a linear map ``forward(input, weight)`` (no bias) whose real output was ``out``.

    Contributions x_i w_ij are split by sign; an output keeps the contributions that share its sign (for x >= 0
    and B_j > 0: x_i w_ij with w_ij > 0, eq. 3). ``transpose(weight, r)`` is the map's transpose (the gradient of
    ``forward`` with respect to its input). ``x`` and ``out`` may have one row for all rows of ``p_out``.
    """
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    signed_input = bool((xn < 0).any())
    # Positive outputs: their excitation is the sum of the positive contributions, x+ w+ and x- w-.
    excite = forward(xp, wp) + (forward(xn, wn) if signed_input else 0)
    r_up = p_out * (_inverse(excite) * (out > 0))  # P(B_j) Z_j
    p_x = xp * transpose(wp, r_up)
    if signed_input:
        p_x = p_x + xn * transpose(wn, r_up)
    negative = out < 0
    if bool((p_out.sum(0, keepdim=True) * negative).any()):  # negative winners: negative contributions win
        inhibit = -(forward(xp, wn) + (forward(xn, wp) if signed_input else 0))
        r_down = p_out * (_inverse(inhibit) * negative)
        p_x = p_x - xp * transpose(wn, r_down)
        if signed_input:
            p_x = p_x - xn * transpose(wp, r_down)
    return p_x


class _Excited(torch.autograd.Function):
    """A convolution-like layer: the real output forward, eq. 2-3 backward.

    ``real`` computes the layer's real output; ``weight`` and ``conv`` (stride, padding, dilation, groups) give
    the linear map whose weights F enter eq. 3 (the layer's own weights, or all-one kernels for pooling).
    """

    @staticmethod
    def forward(ctx, x, real, weight, conv):
        (x,), rows = _shared_rows(x)
        out = real(x)
        ctx.save_for_backward(x, weight, out)
        ctx.conv = conv
        return _expand(out, rows)

    @staticmethod
    def backward(ctx, p_out):
        x, weight, out = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        shape = (p_out.shape[0], *x.shape[1:])

        def forward(a, w):
            return F.conv2d(a, w, None, stride, padding, dilation, groups)

        def transpose(w, r):
            return torch.nn.grad.conv2d_input(shape, w, r, stride, padding, dilation, groups)

        return _linear_rule(x, weight, out, p_out, forward, transpose), None, None, None


class _ExcitedSum(torch.autograd.Function):
    """Residual addition: the sum's probability is split in proportion to the terms' contributions (those of
    the sum's sign), as eq. 3 with unit weights."""

    @staticmethod
    def forward(ctx, a, b):
        (a, b), rows = _shared_rows(a, b)
        out = a + b
        sign = torch.sign(out)
        ca, cb = (a * sign).clamp(min=0), (b * sign).clamp(min=0)
        z = _inverse(ca + cb)
        ctx.save_for_backward(ca * z, cb * z)
        return _expand(out, rows)

    @staticmethod
    def backward(ctx, p_out):
        share_a, share_b = ctx.saved_tensors
        return p_out * share_a, p_out * share_b


class _PassThrough(torch.autograd.Function):
    """ReLU / ReLU6: the real activation forward, probabilities unchanged backward."""

    @staticmethod
    def forward(ctx, x, real):
        (x,), rows = _shared_rows(x)
        return _expand(real(x), rows)

    @staticmethod
    def backward(ctx, p_out):
        return p_out, None


class _Pad(torch.autograd.Function):
    """Zero padding (timm's "same" convolutions): padded positions are zero and get no probability; the others
    keep theirs (the backward crops)."""

    @staticmethod
    def forward(ctx, x, pad):
        (x,), rows = _shared_rows(x)
        ctx.pad = pad
        return _expand(F.pad(x, pad), rows)

    @staticmethod
    def backward(ctx, p_out):
        return F.pad(p_out, [-v for v in ctx.pad]), None


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if isinstance(padding, str):
        raise ObjretError(f"DASR: convolutions with padding={padding!r} are not handled (use explicit padding)")
    conv = (stride, padding, dilation, groups)
    return _Excited.apply(input, lambda x: F.conv2d(x, weight, bias, *conv), weight.detach(), conv)


def _pool(input, real, kernel_size, stride, padding, dilation=1, ceil_mode=False):
    """Pooling as a convolution with all-one weights within each channel (sec. III-A)."""
    if ceil_mode:
        raise ObjretError("DASR: pooling with ceil_mode=True is not handled")
    kh, kw = _pair(kernel_size)
    ones = torch.ones(input.shape[1], 1, kh, kw, dtype=input.dtype, device=input.device)
    conv = (stride if stride else (kh, kw), padding, dilation, input.shape[1])
    return _Excited.apply(input, real, ones, conv)


def _max_pool(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    if return_indices:
        raise ObjretError("DASR: max pooling with return_indices is not handled")
    real = lambda x: F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)  # noqa: E731
    return _pool(input, real, kernel_size, stride, padding, dilation, ceil_mode)


def _avg_pool(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
              divisor_override=None):
    real = lambda x: F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad,  # noqa: E731
                                  divisor_override)
    return _pool(input, real, kernel_size, stride, padding, 1, ceil_mode)


def _relu(input, inplace=False):
    return _PassThrough.apply(input, torch.relu)


def _relu6(input, inplace=False):
    return _PassThrough.apply(input, lambda x: F.hardtanh(x, 0.0, 6.0))


def _hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    return _PassThrough.apply(input, lambda x: F.hardtanh(x, min_val, max_val))


# In-place variants are computed out of place: the modules use the returned tensor.
_ACTIVATIONS = {F.relu: _relu, torch.relu: _relu, torch.relu_: _relu, torch.Tensor.relu: _relu,
                torch.Tensor.relu_: _relu, F.relu6: _relu6, F.hardtanh: _hardtanh}
_ADDS = (torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__iadd__,
         torch.Tensor.__radd__)
# Ops that would scale probabilities wrongly if autograd's own backward ran through them.
_UNHANDLED = {F.batch_norm: "BatchNorm not folded into a convolution", torch.mul: "multiplication",
              torch.Tensor.mul: "multiplication", torch.Tensor.__mul__: "multiplication",
              torch.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid", F.silu: "SiLU",
              F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.gelu: "GELU", F.linear: "linear layer",
              F.adaptive_avg_pool2d: "adaptive average pooling", torch.matmul: "matmul"}


class _ExcitationMode(TorchFunctionMode):
    """Within this mode, layers get the backward of eq. 2-3 (the forward values are unchanged)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            return _conv(*args, **kwargs)
        if func in _ACTIVATIONS:
            return _ACTIVATIONS[func](*args, **kwargs)
        if func in _ADDS and len(args) == 2 and not kwargs and all(isinstance(a, torch.Tensor) for a in args) \
                and args[0].shape == args[1].shape:
            return _ExcitedSum.apply(*args)
        if func is F.pad and len(args) == 2 and kwargs.get("mode", "constant") == "constant" \
                and not kwargs.get("value"):
            return _Pad.apply(*args)
        if func is F.max_pool2d:
            return _max_pool(*args, **kwargs)
        if func is F.avg_pool2d:
            return _avg_pool(*args, **kwargs)
        if func in _UNHANDLED and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            raise ObjretError(f"DASR back-propagation does not handle {_UNHANDLED[func]}")
        return func(*args, **kwargs)


def excitation_backprop(net: torch.nn.Module, x: torch.Tensor, start) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability P(x) at the input of ``net`` for the probability ``start(out)`` put on its output.

    ``start`` maps the real output (detached) to P(out), a non-negative tensor of the same shape. The whole
    batch goes through ONE forward and ONE backward pass; samples are independent. Returns (P(x), out).
    BatchNorm must already be folded into the convolutions (see ``fold_batchnorm``).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), _ExcitationMode():
        out = net(x)
    p_out = start(out.detach())
    (p_x,) = torch.autograd.grad(out, x, p_out)
    return p_x, out.detach()


# ---------------------------------------------------------------------------------------------------------------
# The backbones as a sequence of stages, BatchNorm folded
# ---------------------------------------------------------------------------------------------------------------

def fold_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """Folds every BatchNorm into the convolution registered just before it (in place); BatchNorm then becomes
    its activation (timm's BatchNormAct2d) or nothing. Eval-mode BatchNorm is a per-channel affine map, so
    conv+BN is one convolution with weight F * scale and a bias."""
    previous_conv = None
    replace = []
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            previous_conv = module
        elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            conv = previous_conv
            if conv is None or conv.out_channels != module.num_features:
                raise ObjretError(f"DASR: no convolution to fold BatchNorm {name} into")
            scale = module.weight / torch.sqrt(module.running_var + module.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(module.running_mean)
            with torch.no_grad():
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias = torch.nn.Parameter((bias - module.running_mean) * scale + module.bias)
            previous_conv = None
            act = getattr(module, "act", None)  # timm BatchNormAct2d: BN, dropout (eval: none), activation
            replace.append((name, torch.nn.Sequential(module.drop, act) if act is not None else torch.nn.Identity()))
    for name, new in replace:
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, child, new)
    return net


def _stages(extractor: torch.nn.Module) -> list[torch.nn.Module]:
    """The extractor as consecutive stages whose outputs include every stride's last map."""
    if hasattr(extractor, "conv_stem") and hasattr(extractor, "blocks"):  # timm EfficientNet features
        return [torch.nn.Sequential(extractor.conv_stem, extractor.bn1), *extractor.blocks]
    if hasattr(extractor, "conv1") and hasattr(extractor, "layer1"):  # torchvision ResNet feature extractor
        import torchvision

        resnet = torchvision.models.resnet50(weights=None)
        missing, _ = resnet.load_state_dict(extractor.state_dict(), strict=False)
        if any(not key.startswith("fc.") for key in missing):
            raise ObjretError("DASR needs a ResNet-50 extractor that returns layer4 (stride32)")
        return [torch.nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool), resnet.layer1,
                resnet.layer2, resnet.layer3, resnet.layer4]
    raise ObjretError(f"DASR does not know the extractor {type(extractor).__name__}")


@dataclass
class _Prepared:
    stages: list[torch.nn.Module]
    layer_stage: dict[str, int]  # "strideS" -> index of the last stage with that stride; "input" -> -1


_PREPARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _prepare(backbone) -> _Prepared:
    """Folded copies of the backbone's stages (cached per backbone), checked against the backbone itself."""
    if backbone in _PREPARED:
        return _PREPARED[backbone]
    stages = [fold_batchnorm(copy.deepcopy(stage)).eval().requires_grad_(False)
              for stage in _stages(backbone.extractor)]
    device = next(backbone.extractor.parameters()).device
    probe = torch.randn(1, 3, 64, 64, device=device, generator=torch.Generator(device).manual_seed(0))
    layer_stage, outputs, x = {"input": -1}, {}, probe
    with torch.no_grad():
        for i, stage in enumerate(stages):
            x = stage(x)
            name = f"stride{64 // x.shape[-1]}"
            layer_stage[name], outputs[name] = i, x
        expected = backbone(probe)
    for name, value in expected.items():
        if name not in outputs or not torch.allclose(outputs[name], value, rtol=1e-3, atol=1e-3):
            raise ObjretError(f"DASR: the folded stages do not reproduce the backbone's {name} map")
    _PREPARED[backbone] = _Prepared(stages, layer_stage)
    return _PREPARED[backbone]


# ---------------------------------------------------------------------------------------------------------------
# Peaks, ellipses, NMS
# ---------------------------------------------------------------------------------------------------------------

def find_peaks(mean_map: torch.Tensor, peaks: str = "above_mean") -> list[tuple[float, int, int]]:
    """(X̄ value, row, col) of the peaks of one h x w mean map, strongest first.

    "above_mean": every position above the map's mean (DASR*, sec. III-B); "local_max": the 3x3 local
    maxima (DASR, sec. III-A)."""
    if peaks == "above_mean":
        keep = mean_map > mean_map.mean()
    elif peaks == "local_max":
        keep = mean_map >= F.max_pool2d(mean_map[None, None], 3, 1, 1)[0, 0]
    else:
        raise ObjretError(f"unknown peaks {peaks!r}: above_mean (DASR*) or local_max (DASR)")
    rows, cols = torch.nonzero(keep, as_tuple=True)
    found = [(float(mean_map[r, c]), int(r), int(c)) for r, c in zip(rows.tolist(), cols.tolist())]
    return sorted(found, key=lambda p: -p[0])


def _top_neuron_start(out: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """P(X) for a unit of probability on the channel-mean neuron at each sample's peak (eq. 3 with weights
    1/C, which cancel): the channels share it in proportion to their activation of the sign of the mean."""
    start = torch.zeros(out.shape, dtype=out.dtype, device=out.device)
    k = torch.arange(out.shape[0], device=out.device)
    column = out[k, :, rows, cols]                       # K x C
    aligned = (column * torch.sign(column.mean(1, keepdim=True))).clamp(min=0)
    start[k, :, rows, cols] = aligned / aligned.sum(1, keepdim=True).clamp(min=_EPS)
    return start


def ellipse_box(prob_map: np.ndarray, threshold: float, cell_size: tuple[float, float]):
    """Box (x, y, w, h) in pixels of the ellipse fitted to ``prob_map`` >= threshold * max (eq. 4).

    The positions kept give a mean and a covariance (unweighted second moments, eq. 4; each position is a
    cell, whose own spread adds 1/12 cell^2). A uniformly filled ellipse with semi-axis a has std a/2 along
    that axis, so the fitted ellipse is {d : d' cov^-1 d <= 4} and its circumscribed rectangle is
    mean +- 2 std along x and y. Returns None for an empty map."""
    peak = float(prob_map.max())
    if not peak > 0:
        return None
    rows, cols = np.nonzero(prob_map >= threshold * peak)
    cx, cy = cols.mean() + 0.5, rows.mean() + 0.5
    half_w, half_h = 2 * math.sqrt(cols.var() + 1 / 12), 2 * math.sqrt(rows.var() + 1 / 12)
    sx, sy = cell_size
    return (float((cx - half_w) * sx), float((cy - half_h) * sy), float(2 * half_w * sx), float(2 * half_h * sy))


def _clip_box(box, width: int, height: int):
    x0, y0 = max(0.0, box[0]), max(0.0, box[1])
    x1, y1 = min(float(width), box[0] + box[2]), min(float(height), box[1] + box[3])
    return (x0, y0, max(0.0, x1 - x0), max(0.0, y1 - y0))


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def nms(regions: list[Region], beta: float) -> list[Region]:
    """Greedy NMS (sec. III-B): highest X̄ first; a region overlapping a kept one by IoU > beta is dropped."""
    kept: list[Region] = []
    for region in sorted(regions, key=lambda r: -r.score):
        if all(box_iou(region.box, k.box) <= beta for k in kept):
            kept.append(region)
    return kept


# ---------------------------------------------------------------------------------------------------------------
# DASR regions
# ---------------------------------------------------------------------------------------------------------------

def dasr_regions(backbone, images: torch.Tensor, *, target_layer: str = "stride32", to_layer: str = "stride8",
                 peaks: str = "above_mean", threshold: float = 0.2, nms_beta: float | None = 0.3,
                 max_peaks: int = 64, max_regions: int = 16, chunk_size: int = 16) -> list[list[Region]]:
    """DASR* (default) or DASR regions of each image of a preprocessed batch (N x 3 x H x W).

    ``threshold`` is tau on the max-normalised probability map (the paper uses 0.1, see the module notes);
    ``max_peaks`` caps the peaks back-propagated per image (strongest first: cost grows linearly with it);
    ``nms_beta`` None skips NMS. Boxes are (x, y, w, h) in pixels of the network input (W x H), clipped to it;
    scale them to the original frame yourself. One backward pass per ``chunk_size`` peaks of an image.
    """
    if to_layer not in STOP_LAYERS:
        raise ObjretError(f"unknown to_layer {to_layer!r}: one of {STOP_LAYERS}")
    prepared = _prepare(backbone)
    if target_layer not in backbone.spec.layers or target_layer not in prepared.layer_stage:
        raise ObjretError(f"DASR target layer {target_layer!r} is not a layer of backbone {backbone.spec.name}")
    stop, target = prepared.layer_stage[to_layer], prepared.layer_stage[target_layer]
    if stop >= target:
        raise ObjretError(f"DASR: to_layer {to_layer} must lie below target_layer {target_layer}")
    device = next(backbone.extractor.parameters()).device
    images = images.to(device, torch.float32)
    height, width = images.shape[-2:]

    # One forward pass per image up to the stopping layer, and on to the target layer for the peaks.
    lower = torch.nn.Sequential(*prepared.stages[:stop + 1])
    upper = torch.nn.Sequential(*prepared.stages[stop + 1:target + 1])
    with torch.no_grad():
        low = lower(images)
        mean_maps = upper(low).mean(1)
    found: list[list[Region]] = [[] for _ in range(len(images))]
    cell = (width / low.shape[-1], height / low.shape[-2])
    for n in range(len(images)):
        image_peaks = find_peaks(mean_maps[n], peaks)[:max_peaks]
        for begin in range(0, len(image_peaks), chunk_size):
            chunk = image_peaks[begin:begin + chunk_size]
            rows, cols = [p[1] for p in chunk], [p[2] for p in chunk]
            # The image's map expanded to one row per peak: one forward, and one backward for the chunk.
            shared = low[n:n + 1].expand(len(chunk), *low.shape[1:])
            p_low, _ = excitation_backprop(upper, shared, lambda out: _top_neuron_start(out, rows, cols))
            maps = p_low.sum(1).clamp(min=0).cpu().numpy()  # P per position of the stopping layer
            for (score, row, col), prob in zip(chunk, maps):
                box = ellipse_box(prob, threshold, cell)
                if box is not None:
                    found[n].append(Region(_clip_box(box, width, height), score, (row, col), float(prob.sum())))
    if nms_beta is not None:
        found = [nms(regions, nms_beta) for regions in found]
    return [sorted(regions, key=lambda r: -r.score)[:max_regions] for regions in found]
