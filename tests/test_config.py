"""objret.config: params.yaml loaded once into typed sections; every problem an ObjretError naming the key."""

from __future__ import annotations

import pytest
import yaml

from objret.config import DEFAULT_PARAMS, Params, load_params, params_from_dict
from objret.errors import ObjretError

DATA_FLOW = ["lake", "features", "regions", "index", "graph", "mining", "dataset", "eval", "scale_out", "service",
             "tracking"]


def _user_file(tmp_path, data: dict):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_params_yaml_loads_into_typed_sections():
    params = load_params()
    assert isinstance(params, Params)
    assert params.mining.rerank == 150 and params.mining.shortlist == 1000 and params.mining.method == "fused"
    assert params.index.map_store.pq_m == 12 and params.index.cells.layer == "stride16"
    assert params.regions.egm.sigma == 2.5 and params.graph.discovery.egm.sigma == 2.0
    assert params.mining.weights.global_ == 0.3 and params.to_dict()["mining"]["weights"]["global"] == 0.3
    # The repository's file given by path is the same as no path.
    assert load_params(DEFAULT_PARAMS) == params
    # A dict (another process, a Prefect parameter) comes back as the same parameters, with the same digest.
    again = params_from_dict(params.to_dict())
    assert again == params and again.digest() == params.digest()
    # Read-only: a change is a new, validated Params.
    with pytest.raises(Exception):
        params.mining.top_k = 5
    changed = params.replace("mining.top_k=5", "mining.weights.global=0.5")
    assert changed.mining.top_k == 5 and changed.mining.weights.global_ == 0.5 and params.mining.top_k == 50
    assert changed.digest() != params.digest()


def test_params_yaml_sections_follow_the_data_flow():
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    sections = [key for key, value in raw.items() if isinstance(value, dict)]
    assert sections == DATA_FLOW
    assert [name for name in Params.model_fields if name != "workdir"] == DATA_FLOW


def test_a_misspelt_key_in_a_params_file_is_named(tmp_path):
    path = _user_file(tmp_path, {"mining": {"topk": 5}})
    with pytest.raises(ObjretError, match=r"unknown parameter 'mining\.topk'") as info:
        load_params(path)
    assert str(path) in str(info.value)
    nested = _user_file(tmp_path, {"regions": {"egm": {"sigmma": 1.0}}})
    with pytest.raises(ObjretError, match=r"unknown parameter 'regions\.egm\.sigmma'"):
        load_params(nested)
    section = _user_file(tmp_path, {"minning": {"top_k": 5}})
    with pytest.raises(ObjretError, match=r"unknown section\(s\) 'minning'"):
        load_params(section)


def test_a_misspelt_key_on_the_command_line_is_named():
    with pytest.raises(ObjretError, match=r"unknown parameter 'mining\.topk'"):
        load_params(None, ["mining.topk=5"])
    with pytest.raises(ObjretError, match=r"no section 'minning'"):
        load_params(None, ["minning.top_k=5"])
    with pytest.raises(ObjretError, match=r"expected section\.key=value"):
        load_params(None, ["mining.top_k"])


@pytest.mark.parametrize("assignment, key", [
    ("mining.top_k=many", "mining.top_k"),
    ("mining.top_k=5.5", "mining.top_k"),            # no silent conversion of a float to an int
    ("mining.mirror=3", "mining.mirror"),
    ("lake.sources=cam", "lake.sources"),            # a list, not a string
    ("regions.egm.sigma=wide", "regions.egm.sigma"),
    ("graph.alpha=1.5", "graph.alpha"),              # out of range
    ("service.mine_concurrency=0", "service.mine_concurrency"),
])
def test_a_value_of_the_wrong_type_is_named(assignment, key):
    with pytest.raises(ObjretError, match=rf"parameter '{key}' = "):
        load_params(None, [assignment])


def test_a_wrong_type_in_a_params_file_is_named(tmp_path):
    with pytest.raises(ObjretError, match=r"parameter 'mining\.rerank' = 'all'"):
        load_params(_user_file(tmp_path, {"mining": {"rerank": "all"}}))


def test_an_unknown_method_name_is_named():
    with pytest.raises(ObjretError, match=r"parameter 'mining\.method' = 'fussed'"):
        load_params(None, ["mining.method=fussed"])
    with pytest.raises(ObjretError, match=r"parameter 'eval\.methods' = 'fused,nope'"):
        load_params(None, ["eval.methods=fused,nope"])
    assert load_params(None, ["eval.methods=gem, regions"]).eval.methods == "gem, regions"


def test_a_missing_key_is_named():
    data = load_params().to_dict()
    del data["mining"]["top_k"]
    del data["regions"]["egm"]["tau"]
    with pytest.raises(ObjretError) as info:
        params_from_dict(data)
    message = str(info.value)
    assert "missing parameter 'mining.top_k'" in message and "missing parameter 'regions.egm.tau'" in message


def test_a_partial_params_file_is_laid_over_the_defaults(tmp_path):
    path = _user_file(tmp_path, {"workdir": "/data/objret", "mining": {"top_k": 5, "weights": {"global": 0.0}},
                                 "regions": {"egm": {"sigma": 3.0}}})
    params, defaults = load_params(path), load_params()
    assert params.workdir == "/data/objret"
    assert params.mining.top_k == 5 and params.mining.rerank == defaults.mining.rerank
    assert params.mining.weights.global_ == 0.0 and params.mining.weights.region == defaults.mining.weights.region
    assert params.regions.egm.sigma == 3.0 and params.regions.egm.tau == defaults.regions.egm.tau
    assert params.graph == defaults.graph and params.lake == defaults.lake
    # --set comes after the file.
    assert load_params(path, ["mining.top_k=7"]).mining.top_k == 7
    # An empty file: the defaults.
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_params(empty) == defaults


def test_objret_params_names_the_file_when_none_is_given(tmp_path, monkeypatch):
    """How runs started by a Prefect worker find a team's parameter file (prefect.yaml cannot name it)."""
    chosen = _user_file(tmp_path, {"workdir": "/data/objret"})
    (tmp_path / "other").mkdir()
    other = _user_file(tmp_path / "other", {"workdir": "/elsewhere"})
    monkeypatch.setenv("OBJRET_PARAMS", str(chosen))
    assert load_params().workdir == "/data/objret"
    assert load_params(other).workdir == "/elsewhere"   # an explicit file wins
    monkeypatch.setenv("OBJRET_PARAMS", "")
    assert load_params() == params_from_dict(yaml.safe_load(DEFAULT_PARAMS.read_text()))
