"""`dvc repro` over the build's stages (dvc.yaml) on a tiny lake, in a fresh copy of the checkout: every stage
runs, metrics and the recall@K plot hold real numbers, a parameter or code change re-runs only the stages it
reaches, and `dvc push` / `dvc pull` against a real S3 store (SeaweedFS) restore the outputs byte for byte. One
test: each `dvc repro` from scratch costs minutes of Prefect and MLflow start-ups on a 2-core machine."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from objret.eval.bench import load_bench
from tests.helpers.bench_subset import write_subset
from tests.helpers.chance import chance_map

REPO = Path(__file__).resolve().parents[2]
STAGES = ["ingest", "features", "regions", "whitening", "index", "store", "graph", "eval"]
CACHED_OUTS = [".objret/lake", ".objret/features", ".objret/regions", ".objret/whitening", ".objret/index",
               ".objret/store", ".objret/cells", ".objret/graph", ".objret/eval"]
LEFT_OUT = {"dvc.lock"}   # outputs of a run in the checkout itself


def project_files() -> list[str]:
    """The checkout's files as a commit of the working tree would hold them: tracked and new, not ignored."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sorted(f for f in set(listed) if f and f not in LEFT_OUT and not f.startswith("eval/")
                  and (REPO / f).is_file())


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def runner(root: Path, api_url: str):
    """run(*command) in ``root``: stdout, or a failed assertion with the command's output."""
    def run(*command: str) -> str:
        # The stages' python is this one; their flows report to the test's Prefect server. The environment is
        # read now: the S3 fixture's AWS variables (the remote's credentials) are set after the fixtures.
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                   PREFECT_API_URL=api_url, DVC_NO_ANALYTICS="1", DVC_STUDIO_OFFLINE="1", GIT_AUTHOR_NAME="t",
                   GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
        env.pop("MLFLOW_TRACKING_URI", None)   # the work folder's own MLflow store
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
        return done.stdout

    return run


@pytest.fixture
def project(tmp_path, prefect_server):
    """A newcomer's checkout: the working tree's files committed in a new git repository (what a clone of this
    commit holds; a DVC project already, no `dvc init`), params.yaml as shipped."""
    from prefect.settings import PREFECT_API_URL

    root = tmp_path / "clone"
    for name in project_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    run = runner(root, PREFECT_API_URL.value())
    run("git", "init", "-q")
    assert (root / ".dvc" / "config").is_file()
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "project")
    return root, run


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def changed_stages(status_json: str) -> set[str]:
    return set(json.loads(status_json))


def edit_params(root: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_a_fresh_clone_reproduces_the_demo_lake_then_reruns_only_what_changed_and_pushes_to_s3(
        project, bench_dir, tmp_path, s3_store):
    """`dvc repro` on a fresh checkout with lake.sources empty as shipped: `dvc status` and a dry run list every
    stage; the real run (speed knobs only: Lite0 at 320 px, 20 of the demo video's 795 frames) ingests the PETS
    2009 demo video (fetched with `apt-get download opencv-doc`), indexes its frames and scores a bench of 20 PETS
    2009 frames: the instance query of frame 753, whose person is in 3 of the 19 other frames (301-305, not
    101-131). Metrics and the recall@K plot hold real numbers; a parameter or a line of code re-runs only the
    stages that read it; `dvc push` / `dvc pull` against a real S3 store (SeaweedFS) restore every output byte
    for byte. (Not TUD-Campus for the bench: its queries' galleries of this size hold positives only.)"""
    from objret.index.region_index import RegionIndex
    from objret.ingest.lake import Lake

    root, run = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["lake"]["sources"] == []   # shipped empty: the demo video is the lake

    # What `dvc repro` would run, before anything is built: every stage. (A plain `dvc repro --dry` stops at
    # `features` here: DVC 3.67 hashes a stage's dependencies for its run cache even in a dry run, and the lake
    # folder is not there yet, iterative/dvc#9818; --force skips that look-up and prints every command.)
    assert changed_stages(run("dvc", "status", "--json")) == set(STAGES)
    dry = run("dvc", "repro", "--dry", "--force")
    assert ran_stages(dry) == STAGES, dry
    assert "--demo-if-empty" in dry

    every_n = 40   # frames 0, 40, ..., 760 of 795
    bench = write_subset(bench_dir, tmp_path / "bench", "pets09_s2l1", {753, 301, 303, 305, *range(101, 132, 2)})
    params["features"].update(backbone="efficientnet_lite0", max_side=320)
    params["lake"]["video_every_n"] = every_n
    params["regions"]["sources"] = ["whole", "uniform", "egm"]
    params["graph"].update(k=20, sample_frames=0)
    params["mining"].update(scales=[0.75, 1.0, 1.5], mirror=False)
    params["eval"].update(bench=str(bench), methods="fused,gem")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    timings = {}
    start = time.perf_counter()
    built = run("dvc", "repro", "index")
    timings["repro index"] = time.perf_counter() - start
    assert ran_stages(built) == ["ingest", "features", "regions", "whitening", "index"], built
    assert "lake.sources is empty: ingesting the demo video" in built

    frames = Lake(root / ".objret" / "lake").frames()
    assert {Path(f.source).name for f in frames} == {"vtest.avi"}
    assert sorted(f.frame_index for f in frames) == list(range(0, 795, every_n))
    assert all((f.width, f.height) == (768, 576) for f in frames)   # PETS 2009 S2L1 View 001
    (current,) = (root / ".objret" / "index").rglob("CURRENT")   # <backbone>/regions-<store>-<whitening>/
    index = RegionIndex.load(current.parent)
    assert index.recipe["backbone"].startswith("efficientnet_lite0-320")
    assert sorted(index.frame_ids) == sorted(f.frame_id for f in frames) and len(index) > len(frames)

    dry = run("dvc", "repro", "--dry")   # with the folders there, a plain dry run: what is left to run
    assert ran_stages(dry) == ["store", "graph", "eval"], dry
    start = time.perf_counter()
    rest = run("dvc", "repro")
    timings["repro store, graph, eval"] = time.perf_counter() - start
    assert ran_stages(rest) == ["store", "graph", "eval"], rest
    assert changed_stages(run("dvc", "status", "--json")) == set()   # no stage touched another's outputs

    # Metrics: every method's aggregates over the bench's instance query (pets09_s2l1, a video set), far above
    # chance, the expected mAP of random rankings of the same gallery (0.28: 3 positives in 19 frames); measured:
    # 1.0 for both. A random, constant (gallery order puts the positives last) or reversed ranking fails.
    labelled = load_bench(bench)
    (query,) = labelled.queries
    chance = chance_map(labelled, [query])
    assert chance < 0.4
    shown = json.loads(run("dvc", "metrics", "show", "--json"))   # {"<workspace>": {"data": {file: ...}}}
    metrics = next(iter(shown.values()))["data"]["eval/metrics.json"]["data"]
    assert set(metrics) == {"fused", "gem"}
    for name, method in metrics.items():
        video = method["video_instance"]
        assert video["n"] == 1 and chance + 0.5 <= video["mAP"] <= 1 and 0 < video["R@10"] <= 1, (name, video, chance)
    # Plot: mean Recall@K of each method for K = 1 .. the gallery's size (19), through R@10 of the metrics to 1
    # (every gallery frame is ranked).
    with open(root / "eval" / "recall_at_k.csv") as f:
        rows = list(csv.DictReader(f))
    for name in ("fused", "gem"):
        curve = [float(r["recall"]) for r in rows if r["method"] == name]
        assert [int(r["k"]) for r in rows if r["method"] == name] == list(range(1, len(curve) + 1))
        assert len(curve) == len(labelled.gallery_keys(query)) == 19 and curve == sorted(curve) and curve[0] > 0
        assert curve[9] == pytest.approx(metrics[name]["instance"]["R@10"], abs=1e-6)
        assert curve[-1] == pytest.approx(1.0)
    plot = json.loads(run("dvc", "plots", "show", "--json"))["data"]["eval/recall_at_k.csv"][0]
    points = plot["content"]["data"]["values"]
    assert {p["method"] for p in points} == {"fused", "gem"} and len(points) == len(rows)
    assert plot["content"]["encoding"]["color"]["field"] == "method"   # the template's one line per method

    # A stage depends on its own code only: a comment in the mining methods changes eval, nothing else.
    methods = root / "objret" / "mining" / "methods.py"
    methods.write_text(methods.read_text() + "# a comment\n")
    assert changed_stages(run("dvc", "status", "--json")) == {"eval"}
    run("git", "checkout", "--", "objret/mining/methods.py")
    assert changed_stages(run("dvc", "status", "--json")) == set()

    # A parameter reaches only the stages that read it: mining only eval, graph.k only graph.
    edit_params(root, "mining", "top_k", 7)
    assert changed_stages(run("dvc", "status", "--json")) == {"eval"}
    edit_params(root, "mining", "top_k", params["mining"]["top_k"])
    graph_before = tree_digest(root / ".objret" / "graph")
    edit_params(root, "graph", "k", 10)
    assert changed_stages(run("dvc", "status", "--json")) == {"graph"}
    start = time.perf_counter()
    again = run("dvc", "repro")
    timings["repro after graph.k"] = time.perf_counter() - start
    assert ran_stages(again) == ["graph"], again
    assert tree_digest(root / ".objret" / "graph") != graph_before
    assert changed_stages(run("dvc", "status", "--json")) == set()

    # dvc push to S3, then every cached output and the local cache gone, dvc pull: the same bytes again.
    s3_store.client().create_bucket(Bucket="objret-dvc")
    run("dvc", "remote", "add", "-d", "store", "s3://objret-dvc/build")
    run("dvc", "remote", "modify", "store", "endpointurl", s3_store.endpoint_url)
    run("dvc", "remote", "modify", "store", "region", s3_store.region)
    before = {out: tree_digest(root / out) for out in CACHED_OUTS}
    start = time.perf_counter()
    run("dvc", "push")
    timings["push"] = time.perf_counter() - start
    stored = s3_store.client().list_objects_v2(Bucket="objret-dvc", Prefix="build/")
    assert stored["KeyCount"] > 0
    for out in CACHED_OUTS:
        shutil.rmtree(root / out)
    shutil.rmtree(root / ".dvc" / "cache")
    start = time.perf_counter()
    run("dvc", "pull")
    timings["pull"] = time.perf_counter() - start
    assert {out: tree_digest(root / out) for out in CACHED_OUTS} == before
    assert changed_stages(run("dvc", "status", "--json")) == set()
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})
