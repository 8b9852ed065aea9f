"""Excitation backprop (Zhang et al.) realised with autograd: the probabilistic back-propagation rule of
DASR (001 eq. 2-3) through the backbones' stages, BatchNorm folded.

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

Probability mass: for EfficientNet-Lite only ~5-15% of a peak's unit reaches stride 8. The rest sits on
depthwise channels whose folded kernel has no positive weight and which fire through their bias alone (277 of
1152 channels in lite0's last block): eq. 3 gives such winners no input to pass their probability to. Maps
are normalised to their maximum, so this only means those paths carry no evidence. ResNet-50 conserves ~100%.

Batching: the layers below the stopping layer run once per image. The peaks of one image share all
activations, so the layers above run on the image's stopping-layer map expanded (stride 0) to one row per
peak: every layer computes its forward once and only the probabilities have one row per peak. One backward
pass per ``chunk_size`` peaks of an image, never one per peak.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from objret.errors import ObjretError

STOP_LAYERS = ("input", "stride4", "stride8", "stride16")
_EPS = 1e-12


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
class PreparedStages:
    stages: list[torch.nn.Module]
    layer_stage: dict[str, int]  # "strideS" -> index of the last stage with that stride; "input" -> -1


_PREPARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prepare_stages(backbone) -> PreparedStages:
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
    _PREPARED[backbone] = PreparedStages(stages, layer_stage)
    return _PREPARED[backbone]
