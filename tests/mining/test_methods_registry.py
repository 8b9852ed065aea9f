"""objret.mining.methods's registry: one entry per name in objret.config.METHOD_NAMES, the flags candidate
selection reads, and an unknown name refused with the known ones (no bench data needed)."""

from __future__ import annotations

import pytest

from objret.config import METHOD_NAMES, load_params
from objret.errors import ObjretError
from objret.mining.methods import METHODS, RankInputs, get_method, rank


def test_every_configurable_method_is_registered_under_its_name():
    assert tuple(METHODS) == METHOD_NAMES == ("fused", "regions", "dtm", "gem", "rmac", "discovery")
    for name in METHOD_NAMES:
        method = get_method(name)
        assert method is METHODS[name] and method.name == name and callable(method.rank)


def test_the_flags_candidate_selection_reads():
    flags = {name: (m.matches_template, m.every_frame, m.fuses_diffusion) for name, m in METHODS.items()}
    assert flags == {
        "fused": (True, False, True),       # template evidence: mirror view, cell shortlist for a small box
        "regions": (False, False, False),
        "dtm": (True, False, False),
        "gem": (False, True, False),        # one cheap score a frame: no shortlist
        "rmac": (False, True, False),
        "discovery": (False, True, False),
    }


@pytest.mark.parametrize("name", ["nope", "Fused", "", "fused "])
def test_an_unknown_method_is_refused_naming_the_known_ones(name):
    with pytest.raises(ObjretError) as info:
        get_method(name)
    message = str(info.value)
    assert message == f"unknown mining method {name!r}; choose one of fused, regions, dtm, gem, rmac, discovery"
    assert info.value.__cause__ is None and info.value.__suppress_context__   # no KeyError chained on
    # rank looks the name up before it reads the query or the lake.
    params = load_params()
    with pytest.raises(ObjretError, match="unknown mining method"):
        rank(name, None, None, RankInputs(params.mining, params.index.gem_p))


def test_an_unknown_method_in_the_parameters_is_refused_there():
    with pytest.raises(ObjretError, match="mining.method"):
        load_params(None, ["mining.method=nope"])


def test_diffusion_evidence_is_refused_for_a_method_that_does_not_fuse_it():
    params = load_params()
    inputs = RankInputs(params.mining, params.index.gem_p, diffusion=[0.0])
    for name in METHOD_NAMES:
        if name != "fused":
            with pytest.raises(ObjretError, match=f"fused method only, not {name!r}"):
                rank(name, None, None, inputs)
