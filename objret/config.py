"""params.yaml as typed sections, validated once: a misspelt key, a missing one or a value of the wrong type is an
error naming it. Every parameter has exactly one default, in the repository's params.yaml; a user's params file
is laid over it (it may name only what it changes), then ``--set section.key=value`` overrides.

The sections follow the data flow (lake -> features -> regions -> index -> graph -> mining -> dataset -> eval),
then the operations (scale_out, service, tracking).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from objret.errors import ObjretError

DEFAULT_PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"
PARAMS_ENV = "OBJRET_PARAMS"   # a parameter file laid over params.yaml when none is given
SECRET_OVERRIDES_ENV = "OBJRET_SECRET_OVERRIDES"   # JSON list of overrides with URL credentials, applied last

Layer = Literal["stride8", "stride16", "stride32"]
METHOD_NAMES = ("fused", "regions", "dtm", "gem", "rmac", "discovery")
MethodName = Literal["fused", "regions", "dtm", "gem", "rmac", "discovery"]


class Section(BaseModel):
    """A params.yaml section: no unknown keys, no missing ones, no silent type conversion, read-only."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


class LakeParams(Section):
    sources: list[str]
    video_every_n: int = Field(ge=1)
    video_fps: float | None
    max_pixels: int = Field(gt=0)
    min_side: int = Field(ge=1)
    s3_endpoint_url: str | None


class FeaturesParams(Section):
    backbone: Literal["efficientnet_lite2", "efficientnet_lite0", "resnet50"]
    resnet50_weights: str | None
    max_side: int = Field(ge=32)
    layers: list[Layer]
    batch_size: int = Field(ge=1)
    shard_size: int = Field(ge=1)
    keep_cache: bool


class EgmParams(Section):
    sigma: float
    tau: float
    rho: float
    purge: float


class DetectorParams(Section):
    score_threshold: float
    max_boxes: int = Field(ge=1)


class DasrParams(Section):
    to_layer: Literal["input", "stride4", "stride8", "stride16"]
    max_peaks: int = Field(ge=1)


class WhiteningParams(Section):
    enabled: bool
    dim: int = Field(ge=1)
    shrinkage: float = Field(ge=0)
    max_samples: int = Field(ge=2)
    refit_growth: float | None


class RegionsParams(Section):
    layer: Layer
    sources: list[Literal["whole", "uniform", "egm", "detector", "dasr"]]
    uniform_levels: int = Field(ge=1)
    pooling: Literal["avg", "max", "avgmax"]
    egm: EgmParams
    detector: DetectorParams
    dasr: DasrParams
    batch: int = Field(ge=1)
    whitening: WhiteningParams

    def store_key(self) -> dict:
        """What the stored regions depend on (not batching, not the whitening fitted on them)."""
        return self.model_dump(include={"layer", "sources", "uniform_levels", "pooling", "egm", "detector", "dasr"})


class MapStoreParams(Section):
    pq_m: int = Field(ge=1)
    train_frames: int = Field(ge=1)
    shard_frames: int = Field(ge=1)


class CellsParams(Section):
    layer: Layer
    per_frame: int = Field(ge=1)


class IndexParams(Section):
    gem_p: float = Field(gt=0)
    region_kind: Literal["auto", "flat", "ivfpq", "hnsw"]
    flat_max: int = Field(ge=1)
    map_store: MapStoreParams
    cells: CellsParams


class CgParams(Section):
    tol: float = Field(gt=0)
    max_iter: int = Field(ge=1)


class ObjectSaliencyParams(Section):
    Theta: float
    theta: float
    patch: int = Field(ge=1)
    k: int = Field(ge=1)


class DiscoveryParams(Section):
    enabled: bool
    egm: EgmParams


class GraphParams(Section):
    enabled: bool
    k: int = Field(ge=1)
    beta: float
    alpha: float = Field(gt=0, lt=1)
    exact_max: int = Field(ge=1)
    rebuild_growth: float | None
    nprobe: int = Field(ge=1)
    recall_sample: int = Field(ge=0)
    cg: CgParams
    sample_frames: int = Field(ge=0)
    object_saliency: ObjectSaliencyParams
    discovery: DiscoveryParams


class WeightsParams(Section):
    region: float
    template: float
    global_: float = Field(alias="global")
    classes: float = Field(ge=0)


class GateParams(Section):
    top: int = Field(ge=1)
    offset: float
    slope: float


class DiffusionParams(Section):
    enabled: bool
    k: int = Field(ge=1)
    alpha: float = Field(gt=0, lt=1)
    max_iter: int = Field(ge=1)
    weight: float


class FeedbackParams(Section):
    enabled: bool
    positive: float = Field(ge=0)
    negative: float = Field(ge=0)
    templates: int = Field(ge=0)


class MiningParams(Section):
    method: MethodName
    rerank: int = Field(ge=1)
    shortlist: int = Field(ge=1)
    class_frames: int = Field(ge=0)
    reference: int = Field(ge=0)
    maps: Literal["store", "cache"]
    mapped_indexes: bool
    weights: WeightsParams
    fusion: Literal["adaptive", "sum", "max"]
    gate: GateParams
    small_box: float = Field(ge=0, le=1)
    layer: Layer
    mirror: bool
    query_zoom: float = Field(ge=1)
    template_cells: int = Field(ge=1)
    scales: list[float] = Field(min_length=1)
    scale_tolerance: float = Field(ge=0)
    box_colour: float = Field(ge=0)
    top_k: int = Field(ge=1)
    dedup_frames: int = Field(ge=0)
    dedup_iou: float = Field(ge=0, le=1)
    diffusion: DiffusionParams
    feedback: FeedbackParams


class DatasetParams(Section):
    root: str | None
    publish_guard: bool
    registry: str | None
    dvc_remote: str | None
    copy_frames: bool


class EvalParams(Section):
    bench: str
    methods: str   # comma-separated (DVC interpolates it into the eval stage's command line); the first is the default
    tune: dict[str, list[str | bool | int | float | None]]   # `objret eval --held-out`: mining parameters chosen
                                                             # leave-one-set-out, each with its candidate values

    @field_validator("tune")
    @classmethod
    def _mining_parameters(cls, value: dict) -> dict:
        bad = [k for k in value if not k.startswith("mining.")]
        if bad:
            raise ValueError(f"only mining parameters are tuned (the lake and its indexes stay as built): {bad}")
        return value

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: str) -> str:
        unknown = [m for m in method_list(value) if m not in METHOD_NAMES]
        if unknown or not method_list(value):
            raise ValueError(f"expected comma-separated methods among {', '.join(METHOD_NAMES)}")
        return value


def method_list(text: str) -> list[str]:
    """``"fused, gem"`` -> ``["fused", "gem"]``."""
    return [m.strip() for m in text.split(",") if m.strip()]


class ScaleOutParams(Section):
    enabled: bool
    address: str | None
    n_workers: int | None
    threads_per_worker: int = Field(ge=1)
    chunk_frames: int = Field(ge=1)
    index_shards: bool
    serve_shards: bool

    @model_validator(mode="after")
    def _served_shards_are_built_as_shards(self) -> "ScaleOutParams":
        if self.serve_shards and not self.index_shards:
            raise ValueError("serve_shards needs index_shards: true (only index shards are served by workers)")
        return self


class WatchParams(Section):
    sources: list[str]
    interval_s: float = Field(gt=0)


class ServiceParams(Section):
    mine_concurrency: int = Field(ge=1)
    lease_s: float = Field(gt=0)
    refresh_cron: str | None
    watch: WatchParams


class TrackingParams(Section):
    mlflow_uri: str | None
    experiment: str


class Params(Section):
    """Every parameter, typed: ``params.mining.top_k``."""

    workdir: str
    lake: LakeParams
    features: FeaturesParams
    regions: RegionsParams
    index: IndexParams
    graph: GraphParams
    mining: MiningParams
    dataset: DatasetParams
    eval: EvalParams
    scale_out: ScaleOutParams
    service: ServiceParams
    tracking: TrackingParams

    @model_validator(mode="after")
    def _tuned_parameters_exist(self) -> "Params":
        for key in self.eval.tune:
            node = self.to_dict()
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ValueError(f"eval.tune names {key!r}, which is not a parameter")
                node = node[part]
        return self

    def to_dict(self) -> dict:
        """The parameters as params.yaml spells them (for another process, a run record, a Prefect parameter)."""
        return self.model_dump(mode="json", by_alias=True)

    def digest(self) -> str:
        """A short hash of every value, for tagging runs and artifacts."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def replace(self, *assignments: str) -> "Params":
        """A copy with ``section.key=value`` assignments applied (validated like a params file)."""
        data = self.to_dict()
        for assignment in assignments:
            apply_override(data, assignment)
        return params_from_dict(data)


_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact_credentials(text: str) -> str:
    """``text`` with the user:password part of every URL in it replaced by ``***`` (parameters are logged)."""
    return _URL_USERINFO.sub(r"\1***@", text)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:  # not YAML (e.g. a cron line "* * * * *"): the text itself
        return text


def apply_override(params: dict, assignment: str) -> None:
    """``section.key=value`` (the value read as YAML) applied to a params dict in place."""
    if "=" not in assignment:
        raise ObjretError(f"bad override {assignment!r}: expected section.key=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = params
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            raise ObjretError(f"bad override {assignment!r}: no section {key!r}")
        node = node[key]
    if keys[-1] not in node:
        raise ObjretError(f"bad override {assignment!r}: unknown parameter {dotted!r}")
    node[keys[-1]] = _parse_value(raw)


def _merge(base: dict, overlay: dict) -> dict:
    """``overlay`` laid over ``base``, section by section (a section given in part keeps base's other keys)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _problem(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"])
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        return f"unknown parameter {where!r} (misspelt, or not read by objret)"
    if error["type"] == "missing":
        return f"missing parameter {where!r}"
    if not error["loc"]:   # a check across sections: its message names what is wrong
        return error["msg"].removeprefix("Value error, ")
    return f"parameter {where!r} = {value!r}: {error['msg']}"


def params_from_dict(data: dict, source: str = "parameters") -> Params:
    """Validate a complete params dict; every problem is named in one ObjretError."""
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors())
        raise ObjretError(f"bad {source}: {problems}") from None


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ObjretError(f"cannot load parameters from {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ObjretError(f"cannot load parameters from {path}: expected a mapping of sections, got "
                          f"{type(data).__name__}")
    return data


def params_file(path: str | Path | None = None) -> str | Path | None:
    """The parameter file laid over params.yaml: ``path``, else the OBJRET_PARAMS environment variable's, else none.
    The variable reaches runs started by Prefect workers, whose deployments cannot name each machine's file."""
    return path if path is not None else os.environ.get(PARAMS_ENV) or None


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Params:
    """The repository's params.yaml, with the file at ``path`` (default: the one named by the OBJRET_PARAMS
    environment variable, where set) laid over it and then ``overrides``."""
    path = params_file(path)
    data = _read_yaml(DEFAULT_PARAMS)
    source = str(DEFAULT_PARAMS)
    if path is not None and Path(path).resolve() != DEFAULT_PARAMS:
        user = _read_yaml(Path(path))
        unknown = sorted(set(user) - set(data))
        if unknown:
            raise ObjretError(f"bad parameters in {path}: unknown section(s) {', '.join(map(repr, unknown))}")
        data, source = _merge(data, user), str(path)
    # Overrides with URL credentials come last, from the environment: they are kept out of what Prefect stores.
    for assignment in [*(overrides or []), *json.loads(os.environ.get(SECRET_OVERRIDES_ENV) or "[]")]:
        apply_override(data, assignment)
    return params_from_dict(data, f"parameters in {source}")
