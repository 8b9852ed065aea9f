"""Security (issue 7, item 5): no pickle of outside data is ever loaded, a report's fields never make objret read or
write outside its configured roots, and credentials in URLs never reach MLflow params.

The credentials grep over MLflow, Prefect logs, the console and the review page is in test_tracking_server.py."""

from __future__ import annotations

import ast
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from objret import storage
from objret.versions import file_sha256
from objret.errors import ObjretError, ReportError
from objret.ingest.lake import Lake
from objret.mining.report import FailureReport, parse_report
from tasks.report_ledger import ReportLedger
from objret.ingest.roots import resolve_report_frame, resolve_under, workspace_roots

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ["objret", "flows", "tasks", "scripts", "benchmarks"]


# ---- static scan: no unsafe loading, evaluation or shell anywhere in the code ---------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNSAFE_CALLS = {"eval", "exec", "os.system", "os.popen", "yaml.unsafe_load", "yaml.full_load", "torch.jit.load",
                "torch.hub.load", "pd.read_pickle", "pandas.read_pickle", "np.fromfile"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _keyword(call: ast.Call, name: str):
    found = [k.value for k in call.keywords if k.arg == name]
    return found[0] if found else None


def unsafe_uses(path: Path) -> list[str]:
    """Each unsafe call or import in one Python file, as 'file:line: what'."""
    out = []
    tree = ast.parse(path.read_text(), str(path))
    name = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            out += [f"{where}: imports {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in UNSAFE_CALLS:
            out.append(f"{where}: calls {name}")
        if name == "torch.load":
            flag = _keyword(node, "weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                out.append(f"{where}: torch.load without weights_only=True")
        if name.split(".")[-1] in ("load", "save") and name.split(".")[0] in ("np", "numpy"):
            flag = _keyword(node, "allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                out.append(f"{where}: {name} with allow_pickle={ast.unparse(flag)}")
        if name == "yaml.load":
            loader = _keyword(node, "Loader")
            if loader is None or "Safe" not in ast.unparse(loader):
                out.append(f"{where}: yaml.load without a SafeLoader")
        shell = _keyword(node, "shell")
        if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
            out.append(f"{where}: {name} with shell={ast.unparse(shell)}")
    return out


def test_the_code_loads_no_pickle_evaluates_no_text_and_runs_no_shell():
    files = [p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py")) if ".venv" not in p.parts]
    assert len(files) > 50
    found = [use for path in files for use in unsafe_uses(path)]
    assert found == []


def test_the_scan_finds_what_it_looks_for(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import pickle\nimport torch, numpy as np, yaml, subprocess\n"
                     "torch.load('x')\ntorch.load('x', weights_only=False)\ntorch.load('x', weights_only=True)\n"
                     "np.load('x', allow_pickle=True)\nnp.load('x')\n"
                     "yaml.load(t)\nyaml.load(t, Loader=yaml.SafeLoader)\n"
                     "eval('1')\nsubprocess.run('ls', shell=True)\nmodel.eval()\n")
    found = [use.split(": ", 1)[1] for use in unsafe_uses(probe)]
    assert found == ["imports pickle", "torch.load without weights_only=True", "torch.load without weights_only=True",
                     "np.load with allow_pickle=True", "yaml.load without a SafeLoader", "calls eval",
                     "subprocess.run with shell=True"]


def unpersisted_results_missing(path: Path) -> list[str]:
    """Each Prefect @flow / @task in ``path`` that does not say persist_result=False (directly or in a module-level
    dict passed as **kwargs): Prefect would pickle its result (reports, arrays) into its result storage."""
    tree = ast.parse(path.read_text(), str(path))
    dicts = {node.targets[0].id: node.value for node in tree.body if isinstance(node, ast.Assign)
             and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Call)}
    out = []
    for node in ast.walk(tree):
        for decorator in getattr(node, "decorator_list", []):
            call = decorator if isinstance(decorator, ast.Call) else None
            name = ast.unparse(call.func if call else decorator)
            if name not in ("flow", "task", "prefect.flow", "prefect.task"):
                continue
            keywords = list(call.keywords) if call else []
            for keyword in list(keywords):
                if keyword.arg is None and isinstance(keyword.value, ast.Name) and keyword.value.id in dicts:
                    keywords += dicts[keyword.value.id].keywords
            persist = next((k.value for k in keywords if k.arg == "persist_result"), None)
            if not (isinstance(persist, ast.Constant) and persist.value is False):
                out.append(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path.name}:{node.lineno} "
                           f"{node.name}")
    return out


def test_no_flow_or_task_result_is_persisted_by_prefect():
    files = [p for d in ("flows", "tasks") for p in sorted((REPO / d).rglob("*.py"))]
    decorated = sum(len(re.findall(r"^@(flow|task)\b", p.read_text(), re.M)) for p in files)
    assert decorated >= 20
    assert [miss for path in files for miss in unpersisted_results_missing(path)] == []


def test_the_persistence_audit_finds_what_it_looks_for(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("OK = dict(retries=1, persist_result=False)\n@flow(name='a', persist_result=False)\ndef a(): pass\n"
                     "@task(**OK)\ndef b(): pass\n@task\ndef c(): pass\n@flow(name='d', persist_result=True)\n"
                     "def d(): pass\n@task(cache_policy=NO_CACHE)\ndef e(): pass\n")
    assert [m.split(" ")[1] for m in unpersisted_results_missing(probe)] == ["c", "d", "e"]


# ---- malicious pickles in the lake, the cache and weight files are refused, never run --------------------------

class Payload:
    """Unpickling this creates ``marker``: proof that a pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_npy(path: Path, marker: Path) -> Path:
    np.save(path, np.array([Payload(marker), 1], dtype=object), allow_pickle=True)
    return path


def evil_npz(path: Path, marker: Path, names: list[str]) -> Path:
    np.savez(path, **{name: np.array([Payload(marker)], dtype=object) for name in names})
    return path


def test_a_pickle_bearing_weights_file_is_refused(tmp_path):
    import torch

    from objret.features.backbone import build_backbone

    marker = tmp_path / "pwned"
    weights = tmp_path / "resnet50.pt"
    torch.save({"conv1.weight": Payload(marker)}, weights)
    with pytest.raises(ObjretError, match="not a plain state_dict file, refused"):
        build_backbone("resnet50", ("stride32",), 320, resnet50_weights=str(weights))
    assert not marker.exists()


def test_pickle_bearing_npy_and_npz_in_the_work_folder_are_refused(tmp_path):
    from objret.features.cache import FeatureCache
    from objret.index.region_index import RegionIndex
    from objret.regions.store import RegionStore
    from objret.regions.whitening import Whitening

    marker = tmp_path / "pwned"
    with pytest.raises(ObjretError, match=r"^not a whitening file: .*w\.npz \(.*allow_pickle=False\)$"):
        Whitening.load(str(evil_npz(tmp_path / "w.npz", marker, ["mean", "projection"])))
    store = RegionStore(tmp_path / "regions")   # a region batch
    evil_npz(store.dir / "regions-0000000000000000.npz", marker, ["frame_ids", "counts", "boxes", "descriptors"])
    with pytest.raises(ObjretError, match="region batch .* damaged .*allow_pickle=False"):
        store.load()
    index = RegionIndex(4, kind="flat")   # the region index: its owner array swapped for a pickle, sizes fixed up
    index.add(["a" * 64, "b" * 64], np.eye(4, dtype=np.float32)[:2], np.ones((2, 4), np.float32))
    index.save(tmp_path / "index")
    version = tmp_path / "index" / (tmp_path / "index" / "CURRENT").read_text().strip()
    evil_npy(version / "owner.npy", marker)
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["files"]["owner.npy"] = {"bytes": (version / "owner.npy").stat().st_size,
                                      "sha256": file_sha256(version / "owner.npy")}
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ObjretError, match="allow_pickle=False"):
        RegionIndex.load(tmp_path / "index")
    cache = FeatureCache(tmp_path / "features", "key")   # a feature shard that is a pickle
    (cache.dir / "shard-0000000000000000.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ObjretError, match="Error while deserializing header"):   # read as safetensors, no more
        cache.cached_ids()
    assert not marker.exists()


def test_pickles_dropped_in_a_lake_folder_are_not_ingested(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "lake_src"
    folder.mkdir()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(folder / "good.png")
    (folder / "evil.jpg").write_bytes(pickle.dumps(Payload(marker)))
    evil_npy(folder / "evil.npy", marker)
    (folder / "evil.pt").write_bytes(pickle.dumps(Payload(marker)))
    result = Lake(tmp_path / "lake").ingest(str(folder), every_n=1, progress=False)
    assert result.added == 1
    assert [uri for uri, _ in result.errors] == [str(folder / "evil.jpg")]   # .npy / .pt are no frames at all
    assert not marker.exists()


# ---- report fields never make objret read or write outside its roots -------------------------------------------

def report(**frame) -> FailureReport:
    """A report as FailureReport, built without the schema so that the roots are tested on their own."""
    return FailureReport("r1", "det", "1", frame.get("frame_id"), frame.get("uri"), frame.get("frame_index"),
                         (1.0, 1.0, 5.0, 5.0), "person", "false_negative")


@pytest.fixture
def lake_roots(tmp_path):
    """A lake of two images ingested from a source folder, a work folder, a secret outside both, and links."""
    source, work, outside = tmp_path / "lake_src", tmp_path / "work", tmp_path / "secret"
    for folder in (source / "cam", work, outside):
        folder.mkdir(parents=True)
    for name, colour in (("a.png", (200, 0, 0)), ("b.png", (0, 200, 0))):
        Image.new("RGB", (64, 48), colour).save(source / "cam" / name)
    Image.new("RGB", (64, 48), (0, 0, 200)).save(source / "not_ingested_yet.png")
    Image.new("RGB", (64, 48), (9, 9, 9)).save(outside / "private.png")
    (source / "out").symlink_to(outside)                       # a link that leaves the source
    (source / "in.png").symlink_to(source / "cam" / "a.png")   # a link that stays inside
    lake = Lake(work / "lake")
    lake.ingest(str(source / "cam"), every_n=1, progress=False)
    return lake, source, work, outside, [str(work), str(source)]


def test_a_frame_the_lake_knows_resolves_to_the_lake_s_frame(lake_roots):
    lake, source, _, _, roots = lake_roots
    first = lake.frames()[0]
    assert resolve_report_frame(lake, report(frame_id=first.frame_id), roots) == (first, first.frame_id)
    assert resolve_report_frame(lake, report(uri=first.uri), roots) == (first, first.uri)
    assert resolve_report_frame(lake, report(uri="cam/a.png"), roots)[0] == first   # a relative name
    with pytest.raises(ReportError) as caught:
        resolve_report_frame(lake, report(frame_id="f" * 64), roots)
    assert caught.value.problems == [f"frame.frame_id: no frame {'f' * 64} in the lake"]
    with pytest.raises(ReportError, match=r"frame\.uri: 'cam/a.png' frame 3 is not in the lake"):
        resolve_report_frame(lake, report(uri="cam/a.png", frame_index=3), roots)


def test_an_image_outside_the_lake_is_read_only_under_a_root(lake_roots):
    lake, source, work, outside, roots = lake_roots
    inside = str(source / "not_ingested_yet.png")
    assert resolve_report_frame(lake, report(uri=inside), roots) == (None, inside)
    assert resolve_report_frame(lake, report(uri=str(work / "x.png")), roots) == (None, str(work / "x.png"))
    # A link that stays inside is read where it points, so what is read is what was checked.
    assert resolve_report_frame(lake, report(uri=str(source / "in.png")), roots) == (None, str(source / "cam/a.png"))
    for uri in ("/etc/passwd", str(outside / "private.png"), f"{source}/../secret/private.png",
                f"{source}/../../../../etc/passwd", str(source / "out" / "private.png"), f"{work}/../secret/x.png",
                "s3://any-bucket/x.jpg", "relative/x.png", str(source) + "2/x.png"):
        with pytest.raises(ReportError) as caught:
            resolve_report_frame(lake, report(uri=uri), roots)
        assert caught.value.problems == [f"frame.uri: {uri!r} is not in the lake and lies outside the lake sources "
                                         "and the work folder"]


def test_s3_roots_hold_their_prefix_by_whole_segments():
    roots = ["s3://lake/cams", "s3://other/one.jpg"]
    assert resolve_under("s3://lake/cams/x.jpg", roots) == "s3://lake/cams/x.jpg"
    assert resolve_under("s3://lake/cams/deep/x.jpg", roots) == "s3://lake/cams/deep/x.jpg"
    assert resolve_under("s3://other/one.jpg", roots) == "s3://other/one.jpg"
    for uri in ("s3://lake/cams2/x.jpg", "s3://lake/x.jpg", "s3://other-bucket/x.jpg", "s3://lake/cams/../x.jpg",
                "s3://lake/cams/./x.jpg", "s3://other/one.jpg2", "/lake/cams/x.jpg"):
        assert resolve_under(uri, roots) is None, uri
    assert resolve_under("s3://lake/cams/x.jpg", ["s3://"]) is None and resolve_under("/etc/passwd", ["s3://x"]) is None


def test_the_mining_query_reads_nothing_outside_the_roots(lake_roots, monkeypatch):
    from objret.steps import mine as mine_step
    from objret.config import load_params
    from objret.steps.workspace import Workspace

    lake, source, work, outside, _ = lake_roots
    ws = Workspace(load_params(None, [f"lake.sources=[{source / 'cam'}]"]), work)
    extra = source / "extra"   # a source ingested from the command line only, not in params.yaml
    extra.mkdir()
    Image.new("RGB", (64, 48), (5, 5, 5)).save(extra / "e.png")
    ws.lake.ingest(str(extra), every_n=1, progress=False)
    assert set(workspace_roots(ws)) == {str(work), str(source / "cam"), str(extra)}
    reads = []
    real_read = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri, *a, **k: (reads.append(uri), real_read(uri, *a, **k))[1])

    frame, pixels, uri = mine_step.resolve_query(ws, parse_report(
        {"report_id": "r", "detector": {"name": "d", "version": "1"}, "frame": {"uri": str(extra / "e.png")},
         "box": [1, 2, 3, 4], "class_name": "c", "failure_kind": "false_negative"}))
    assert frame is not None and pixels is None and uri == str(extra / "e.png")
    for bad in (str(outside / "private.png"), str(source / "out" / "private.png"), "/etc/passwd",
                str(source / "not_ingested_yet.png")):   # the last: under the source folder, not a configured root
        with pytest.raises(ReportError, match=r"^invalid failure report:\n  - frame\.uri: "):
            mine_step.resolve_query(ws, report(uri=bad))
    assert reads == []


def test_report_ids_name_files_only_inside_their_folders(tmp_path):
    from objret.config import load_params
    from objret.steps.workspace import Workspace

    ws = Workspace(load_params(None, []), tmp_path / "work")
    ledger = ReportLedger(tmp_path / "ledger")
    for hostile in ("../x", "a/b", ".hidden", "..", "/etc", "a\\b", "x\x00y", ""):
        with pytest.raises(ObjretError, match=rf"^{re.escape(repr(hostile))} cannot name a run folder$"):
            ws.run_dir(hostile)
        with pytest.raises(ObjretError, match=rf"^report id {re.escape(repr(hostile))} cannot name a ledger entry$"):
            ledger._dir(hostile)
        with pytest.raises(ReportError) as caught:
            parse_report({"report_id": hostile, "detector": {"name": "d", "version": "1"}, "frame": {"uri": "a.jpg"},
                          "box": [1, 2, 3, 4], "class_name": "c", "failure_kind": "false_negative"})
        assert [p.split(":")[0] for p in caught.value.problems] == ["report_id"]
    assert ws.run_dir("mine-a.b_c-1").parent == ws.root / "runs"
    assert not (tmp_path / "x").exists() and not (tmp_path / "work" / "x").exists()


# ---- credentials in URLs never reach MLflow params ---------------------------------------------------------------

def test_credentials_in_parameter_urls_are_not_logged_to_mlflow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from objret.config import load_params
    from objret.steps.workspace import Workspace
    from tasks.tracking import mlflow_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    secret = "s3cr3t-Pa55word"
    ws = Workspace(load_params(None, [f"lake.s3_endpoint_url=http://AKIAEXAMPLE:{secret}@127.0.0.1:9000",
                                      f"dataset.dvc_remote=https://user:{secret}@dvc.example/store"]), tmp_path)
    with mlflow_run(ws, "probe") as run:
        pass
    params = MlflowClient(ws.tracking_uri).get_run(run.info.run_id).data.params
    assert params["lake.s3_endpoint_url"] == "http://***@127.0.0.1:9000"
    assert params["dataset.dvc_remote"] == "https://***@dvc.example/store"
    assert not any(secret in value or "AKIAEXAMPLE" in value for value in params.values())
    assert (tmp_path / "mlflow.db").read_bytes().find(secret.encode()) == -1
