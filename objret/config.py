"""Typed access to params.yaml: one nested dict, loaded once, overridable from the command line."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml

from objret.errors import ObjretError

DEFAULT_PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"


class Params(dict):
    """params.yaml as a dict with attribute access (``p.mining.top_k``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            value = self[name]
        except KeyError as exc:
            raise AttributeError(f"no parameter {name!r}") from exc
        return Params(value) if isinstance(value, dict) and not isinstance(value, Params) else value

    def section(self, name: str) -> "Params":
        return Params(self.get(name) or {})

    def digest(self) -> str:
        """A short hash of every value, for tagging runs and artifacts."""
        return hashlib.sha256(json.dumps(self, sort_keys=True, default=str).encode()).hexdigest()[:12]


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


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Params:
    path = Path(path) if path else DEFAULT_PARAMS
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ObjretError(f"cannot load parameters from {path}: {exc}") from exc
    data = copy.deepcopy(data or {})
    for assignment in overrides or []:
        apply_override(data, assignment)
    return Params(data)
