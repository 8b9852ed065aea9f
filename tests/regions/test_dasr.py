"""objret.regions.dasr: the probabilistic back-propagation rule (001 eq. 2-3) pinned on hand-made nets, and DASR* regions
of EfficientNet-Lite0 on real coco_mini photos of the bench."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from objret.regions import dasr
from objret.features.backbone import build_backbone, preprocess
from objret.boxes import iou_xywh as box_iou
from objret.regions.dasr import dasr_regions, find_peaks
from objret.regions.excitation import excitation_backprop, fold_batchnorm
from objret.errors import ObjretError
from objret.ingest.decode import load_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _conv(c_in, c_out, k=3, stride=1, groups=1, weight=None, bias=False):
    conv = torch.nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=bias)
    if weight is not None:
        conv.weight.data = torch.as_tensor(weight, dtype=torch.float32).reshape(conv.weight.shape)
    return conv.requires_grad_(False)


# --- the rule, by hand ----------------------------------------------------------------------------------------

def test_one_by_one_conv_matches_eq3_by_hand():
    # Two input channels a = (1, 2) at one position, two outputs: b1 = 3*a1 - 1*a2 = 1, b2 = 1*a1 + 1*a2 = 3.
    # Eq. 3 keeps the positive weights: P(a1|b1) = 3*1/(3*1) = 1, P(a2|b1) = 0; P(a1|b2) = 1/3, P(a2|b2) = 2/3.
    # With P(b1) = P(b2) = 1/2 (eq. 2): P(a1) = 1/2 + 1/6 = 2/3, P(a2) = 1/3.
    conv = _conv(2, 2, k=1, weight=[[3.0, -1.0], [1.0, 1.0]])
    a = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    p_a, out = excitation_backprop(conv, a, lambda out: torch.full_like(out, 0.5))
    assert out.flatten().tolist() == [1.0, 3.0]
    assert p_a.flatten().tolist() == pytest.approx([2 / 3, 1 / 3], abs=1e-6)


def _eq23_reference(a: np.ndarray, weight: np.ndarray, p_out: np.ndarray) -> np.ndarray:
    """Eq. 2-3 written out with loops: a (C_in, H, W) >= 0, weight (C_out, C_in, k, k), stride 1, zero padding."""
    c_out, c_in, k, _ = weight.shape
    pad = k // 2
    _, h, w = a.shape
    p_a = np.zeros_like(a)
    for j in range(c_out):
        for y in range(h):
            for x in range(w):
                if p_out[j, y, x] == 0:
                    continue
                terms = {}
                for i in range(c_in):
                    for dy in range(k):
                        for dx in range(k):
                            yy, xx = y + dy - pad, x + dx - pad
                            if 0 <= yy < h and 0 <= xx < w and weight[j, i, dy, dx] > 0:
                                terms[i, yy, xx] = terms.get((i, yy, xx), 0.0) + a[i, yy, xx] * weight[j, i, dy, dx]
                z = sum(terms.values())  # 1 / Z_j
                for (i, yy, xx), t in terms.items():
                    p_a[i, yy, xx] += p_out[j, y, x] * t / z
    return p_a


def test_two_layer_conv_net_matches_the_rule_written_out():
    """conv -> ReLU -> conv (3x3, mixed-sign weights, non-negative input): the autograd realisation equals eq. 2-3
    applied layer by layer with loops, and probability is conserved and non-negative at every layer."""
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(3, 2, 3, 3, generator=g)
    w2 = torch.randn(2, 3, 3, 3, generator=g)
    net = torch.nn.Sequential(_conv(2, 3, weight=w1), torch.nn.ReLU(), _conv(3, 2, weight=w2))
    a = torch.rand(1, 2, 5, 6, generator=g)
    out = net(a)
    # Start: a unit of probability spread over the positive outputs.
    start = out.clamp(min=0)
    start = start / start.sum()

    p_a, _ = excitation_backprop(net, a, lambda _: start)

    hidden = torch.relu(net[0](a))[0].numpy()
    p_hidden = _eq23_reference(hidden, w2.numpy(), start[0].numpy())
    p_input = _eq23_reference(a[0].numpy(), w1.numpy(), p_hidden)
    np.testing.assert_allclose(p_a[0].numpy(), p_input, rtol=1e-4, atol=1e-7)
    assert p_hidden.sum() == pytest.approx(1.0, abs=1e-5)
    assert p_a.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert p_a.min().item() >= 0


def test_mass_is_conserved_layer_by_layer_through_every_layer_type():
    """Conv, depthwise stride-2 conv, max and average pooling, a linear (signed) bottleneck, a residual sum and a
    conv on signed input: without biases every layer hands on all the probability it receives."""
    g = torch.Generator().manual_seed(1)

    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.expand = _conv(4, 8, k=1, weight=torch.randn(8, 4, 1, 1, generator=g))
            self.act = torch.nn.ReLU6()
            self.project = _conv(8, 4, k=1, weight=3 * torch.randn(4, 8, 1, 1, generator=g))  # linear: signed

        def forward(self, x):
            return x + self.project(self.act(self.expand(x)))

    layers = [
        _conv(3, 4, weight=torch.randn(4, 3, 3, 3, generator=g)), torch.nn.ReLU(),
        torch.nn.MaxPool2d(3, 2, 1),
        _conv(4, 4, stride=2, groups=4, weight=torch.randn(4, 1, 3, 3, generator=g)), torch.nn.ReLU6(),
        Residual(),                                               # output signed
        _conv(4, 6, k=1, weight=torch.randn(6, 4, 1, 1, generator=g)), torch.nn.ReLU(),  # signed input
        torch.nn.AvgPool2d(2),
        _conv(6, 5, weight=torch.randn(5, 6, 3, 3, generator=g)),
    ]
    x = torch.rand(2, 3, 32, 32, generator=g)
    inputs = [x]
    with torch.no_grad():
        for layer in layers:
            inputs.append(layer(inputs[-1]))
    start = inputs[-1].clamp(min=0)
    start = start / start.sum(dim=(1, 2, 3), keepdim=True)  # one unit per image
    assert bool((inputs[6] < 0).any())  # the residual block's output is signed

    for first in range(len(layers)):
        p, _ = excitation_backprop(torch.nn.Sequential(*layers[first:]), inputs[first], lambda _: start)
        assert p.min().item() >= 0, first
        np.testing.assert_allclose(p.sum(dim=(1, 2, 3)).numpy(), [1.0, 1.0], atol=1e-4, err_msg=f"layer {first}")


def test_biases_take_no_share_and_batchnorm_folds_exactly():
    g = torch.Generator().manual_seed(2)
    conv = _conv(3, 4, bias=False, weight=torch.randn(4, 3, 3, 3, generator=g))
    bn = torch.nn.BatchNorm2d(4).eval()
    bn.weight.data = torch.tensor([1.5, -0.7, 0.3, 2.0])  # one negative scale: flips the channel's weights
    bn.bias.data = torch.tensor([0.1, 0.2, -0.3, 5.0])
    bn.running_mean.data = torch.tensor([0.2, -0.1, 0.0, 0.3])
    bn.running_var.data = torch.tensor([0.5, 2.0, 1.0, 0.8])
    net = torch.nn.Sequential(conv, bn, torch.nn.ReLU())
    x = torch.rand(1, 3, 8, 8, generator=g)
    with torch.no_grad():
        expected = net(x)
        folded = fold_batchnorm(copy.deepcopy(net))
        np.testing.assert_allclose(folded(x).numpy(), expected.numpy(), atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    # The folded conv has a large bias on channel 3: its probability still goes to the inputs, all of it.
    start = torch.zeros_like(expected)
    start[0, 3, 4, 4] = 1.0
    p, _ = excitation_backprop(folded, x, lambda _: start)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ObjretError, match="BatchNorm"):  # unfolded BatchNorm would scale probabilities
        excitation_backprop(net, x, lambda out: torch.ones_like(out))


def test_unhandled_layer_types_are_refused():
    net = torch.nn.Sequential(_conv(3, 4), torch.nn.SiLU())
    with pytest.raises(ObjretError, match="SiLU"):
        excitation_backprop(net, torch.rand(1, 3, 8, 8), lambda out: torch.ones_like(out))


# --- DASR* on real photos -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", layers=("stride16", "stride32"), max_side=320)


@pytest.fixture(scope="module")
def coco(bench_dir):
    data = json.loads((bench_dir / "coco_mini" / "annotations.json").read_text())
    images = {image["id"]: image for image in data["images"]}
    return bench_dir / "coco_mini", images, data["annotations"]


def _largest_object(coco, image_id):
    root, images, annotations = coco
    boxes = [a for a in annotations if a["image_id"] == image_id and not a["iscrowd"]]
    best = max(boxes, key=lambda a: a["area"])
    return load_image(str(root / images[image_id]["file_name"])), best["bbox"]


# Large, clear objects that do not fill the frame (13-28% of it, so the whole frame has IoU < 0.3 with them):
# clock, person, truck, boat. Measured best IoU at 320 px with the defaults: 0.84, 0.74, 0.66, 0.65.
OBJECTS = [78, 5529, 9769, 63217]


def test_dasr_star_finds_the_large_object_of_real_photos(lite0, coco):
    pre = lite0.spec.preprocessing
    for image_id in OBJECTS:
        image, bbox = _largest_object(coco, image_id)
        x = preprocess(image, pre)[None]
        height, width = x.shape[-2:]
        scale = width / image.shape[1]
        truth = [v * scale for v in bbox]
        assert box_iou((0, 0, width, height), truth) < 0.3  # a whole-frame box would not pass

        (regions,) = dasr_regions(lite0, x, to_layer="stride8", max_peaks=64)

        assert 1 <= len(regions) <= 16
        best = max(box_iou(r.box, truth) for r in regions)
        assert best >= 0.3, f"image {image_id}: best IoU {best:.2f}"
        for r in regions:
            x0, y0, w, h = r.box
            assert 0 <= x0 and 0 <= y0 and w > 0 and h > 0
            assert x0 + w <= width + 1e-3 and y0 + h <= height + 1e-3
            assert 0 < r.mass <= 1 + 1e-4  # probability only gets lost (to biases), never created
        scores = [r.score for r in regions]
        assert scores == sorted(scores, reverse=True)
        # NMS (beta 0.3): no two kept regions overlap more.
        assert all(box_iou(a.box, b.box) <= 0.3 for i, a in enumerate(regions) for b in regions[i + 1:])


def test_backward_passes_are_one_per_chunk_and_chunking_changes_nothing(monkeypatch, coco):
    backbone = build_backbone("efficientnet_lite0", layers=("stride16", "stride32"), max_side=192)
    image, _ = _largest_object(coco, OBJECTS[0])
    x = preprocess(image, backbone.spec.preprocessing)
    batch = torch.stack([x, x.flip(-1)])  # two different images of one size
    with torch.no_grad():
        mean_maps = backbone(batch)["stride32"].mean(1)
    max_peaks, chunk = 12, 5
    n_peaks = [min(len(find_peaks(m)), max_peaks) for m in mean_maps]
    assert min(n_peaks) > chunk

    calls = []
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls.append(1)
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    chunked = dasr_regions(backbone, batch, to_layer="stride8", max_peaks=max_peaks, chunk_size=chunk, nms_beta=None)
    assert len(calls) == sum(math.ceil(n / chunk) for n in n_peaks) < sum(n_peaks)

    # The peaks of a chunk share activations but not probabilities: one peak per pass gives the same regions.
    single = dasr_regions(backbone, batch, to_layer="stride8", max_peaks=max_peaks, chunk_size=1, nms_beta=None)
    assert len(calls) == sum(math.ceil(n / chunk) for n in n_peaks) + sum(n_peaks)
    for a, b in zip(chunked, single):
        assert [r.peak for r in a] == [r.peak for r in b]
        np.testing.assert_allclose([r.box for r in a], [r.box for r in b], atol=1e-3)
        np.testing.assert_allclose([r.mass for r in a], [r.mass for r in b], rtol=1e-4)


def test_bad_arguments_are_refused(lite0):
    x = torch.zeros(1, 3, 64, 64)
    with pytest.raises(ObjretError, match="to_layer"):
        dasr_regions(lite0, x, to_layer="stride2", max_peaks=64)
    with pytest.raises(ObjretError, match="below"):
        dasr_regions(lite0, x, target_layer="stride16", to_layer="stride16", max_peaks=64)
    with pytest.raises(ObjretError, match="peaks"):
        dasr.find_peaks(torch.zeros(3, 3), "everywhere")
