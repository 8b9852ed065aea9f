"""Fault injection for tests/steps/test_crash_safety.py: build-index's steps killed with SIGKILL at seeded random moments.

    python tests/helpers/crash_driver.py PLAN.json     -> one JSON line on stdout: every run, where each kill landed

A run is what the build-index flow does (objret.steps's ingest, features, regions, whitening, index, graph, the
functions its Prefect tasks wrap one to one), in a forked child of this process: torch is imported and the
backbone built once, so a run starts in milliseconds where a fresh Python would spend seconds, and 20+ kills fit in
a test. The child is killed with SIGKILL, as `kill -9` of the flow would be: no handler, no cleanup.

Kills are aimed at a phase (the child marks each step as it starts): the driver waits until the target step has
started, then a random time within that step's duration in the uninterrupted reference run, and the child
kills itself with SIGKILL then (a timer in the child: no polling delay). Where the
kill actually landed is the last step the child had marked. A write window is a few milliseconds, so timed kills
rarely catch one; kills at a rename catch them on purpose: the child kills itself with SIGKILL at its n-th
os.replace / os.rename, the temp file or folder written in full but not yet renamed (the worst moment).

After every kill the visible state is opened the way the next run opens it (every shard, batch, whitening, index
and graph) to show that nothing half-written is visible; the next run resumes in the same folder.

PLAN: {"overrides": [...], "sources": [...], "reference": dir, "rounds": [{"dir": dir, "targets": [step, ...]},
{"dir": dir, "random": n}, {"dir": dir, "renames": n}], "seed": int}. ``targets``: a kill aimed at each step in
turn, then a run to the end; ``random``: up to n kills at uniform(0, 0.8 T) of the run's start (T: the reference
run's length), then one to the end; ``renames``: up to n kills at a rename drawn from 1-4, then one to the end.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import sys
import time
import traceback
from pathlib import Path

STEPS = ("ingest", "features", "regions", "whitening", "index", "store", "graph")


def run_steps(ws, sources: list[str], mark) -> None:
    from objret.steps import features as features_step, graph as graph_step, index as index_step, ingest as ingest_step, regions as regions_step, store as store_step, whitening as whitening_step

    mark("ingest")
    ingest_step.ingest(ws, sources, progress=False)
    mark("features")
    cached = features_step.features(ws, progress=False)
    mark("regions", computed=cached.computed, already=cached.already_cached)
    found = regions_step.regions(ws, progress=False)
    mark("whitening", extracted=found.extracted, already=found.already_stored)
    whitening_step.whitening(ws)
    mark("index")
    index_step.build_index(ws)
    mark("store")
    stored = store_step.store(ws, progress=False)
    store_step.cells(ws, progress=False)
    mark("graph", stored=stored.stored, already_stored=stored.already_stored)
    graphed = graph_step.graph(ws)
    mark("done", graph=graphed.mode)


class Driver:
    def __init__(self, plan: dict):
        import faiss
        import torch

        # One thread: no OpenMP pool exists before a fork (a forked libgomp pool hangs) and the 2 cores are shared.
        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
        from objret.config import load_params
        from objret.steps.workspace import Workspace

        # The steps' lazy imports too, before any fork: the reference run then times the steps' work, not a first
        # import (graph: 25 ms of work, 170 ms of scipy/faiss imports), so a kill drawn within a step lands in it.
        import objret.graph.centrality  # noqa: F401
        import objret.graph.knn  # noqa: F401
        import objret.graph.store  # noqa: F401
        import objret.steps.graph  # noqa: F401

        self.plan = plan
        self.params = load_params(None, plan["overrides"])
        self.backbone = Workspace(self.params, plan["reference"]).backbone   # shared by every fork
        self.rng = random.Random(plan.get("seed", 0))

    def workspace(self, root: str):
        from objret.steps.workspace import Workspace

        ws = Workspace(self.params, root)
        ws.__dict__["backbone"] = self.backbone   # the cached_property, preset
        return ws

    def run(self, root: str, target: str | None = None, delay: float | None = None,
            at_rename: int | None = None) -> dict:
        """One run in a forked child; killed ``delay`` s after ``target`` started (after the run started when
        ``target`` is None), or at its ``at_rename``-th rename, or left to finish."""
        marker = Path(root).with_name(Path(root).name + ".marks")
        marker.write_text("")
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:   # the child: never returns
            code = 1
            try:
                fd = os.open(marker, os.O_WRONLY | os.O_APPEND)

                def kill_after(seconds: float) -> None:
                    # The child times its own kill from the moment its step starts: a parent polling for the step's
                    # mark would notice it too late to land inside a step of a few tens of milliseconds (graph).
                    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGKILL))
                    timer.daemon = True
                    timer.start()

                def mark(step: str, **info) -> None:
                    os.write(fd, (json.dumps({"step": step, "t": time.monotonic() - start, **info}) + "\n").encode())
                    if delay is not None and step == target:
                        kill_after(delay)

                if delay is not None and target is None:
                    kill_after(delay)

                if at_rename is not None:
                    _die_at_rename(at_rename, lambda dst: os.write(fd, (json.dumps({"rename": str(dst)}) + "\n")
                                                                   .encode()))

                run_steps(self.workspace(root), self.plan["sources"], mark)
                code = 0
            except BaseException:
                os.write(fd, (json.dumps({"step": "error", "error": traceback.format_exc()}) + "\n").encode())
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        killed = delay is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        kill_at = time.monotonic() - start if killed else None
        lines = _marks(marker)
        marks = [m for m in lines if "step" in m]
        renamed = [m["rename"] for m in lines if "rename" in m]
        if renamed:   # killed itself at a rename
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            kill_at = time.monotonic() - start
        errors = [m["error"] for m in marks if m["step"] == "error"]
        if errors or (not killed and status != 0):
            raise RuntimeError(f"run in {root} failed (status {status}):\n" + "\n".join(errors))
        landed = marks[-1]["step"] if marks else "startup"
        return {"killed": killed, "target": target or ("rename" if at_rename else None),
                "landed": landed if killed else None, "at_rename": renamed[-1] if renamed else None,
                "kill_at_s": None if kill_at is None else round(kill_at, 3),
                "seconds": round(time.monotonic() - start, 3), "marks": marks}

    def visible_state(self, root: str) -> dict:
        """Open everything the next run would open; an exception here is a half-written artifact made visible."""
        from objret.graph.store import load_graph
        from objret.index.region_index import RegionIndex
        from objret.versions import current_version

        ws = self.workspace(root)
        state = {"frames": len(ws.lake)}
        cache = ws.cache.__class__(ws.cache.dir.parent, ws.cache.cache_key)
        ids = sorted(cache.cached_ids())
        for layer in self.backbone.spec.layers:
            cache.load(ids, layer)
        state["cached"] = len(ids)
        store = ws.region_store
        state["region_frames"] = len(store.load().frame_ids) if store.batches() else 0
        whitening = ws.whitening_path.exists() and ws.load_whitening() is not None
        state["whitening"] = whitening
        state["index_frames"] = state["graph_nodes"] = None
        if whitening and current_version(ws.current_index_dir()):
            state["index_frames"] = RegionIndex.load(ws.current_index_dir(), use_gpu=False).n_frames
            graph = load_graph(ws.graph_dir())
            state["graph_nodes"] = graph.nodes if graph is not None else None
        maps = ws.map_store.__class__(ws.map_store.dir)   # a fresh reader: every shard opened, every frame checked
        stored = sorted(maps.stored_ids())
        maps.load_maps(stored)
        state["stored"] = len(stored)
        cells_dir = ws.cells_dir()
        state["cell_frames"] = (RegionIndex.load(cells_dir, use_gpu=False).n_frames
                                if current_version(cells_dir) else 0)
        state["temp_files"] = sorted(str(p.relative_to(root)) for p in Path(root).rglob("*.tmp"))
        return state

    def main(self) -> dict:
        reference = self.run(self.plan["reference"])
        phase_s = _phase_seconds(reference["marks"])
        total_s = reference["seconds"]
        rounds = []
        for spec in self.plan["rounds"]:
            root, runs = spec["dir"], []
            if "targets" in spec:
                for target in spec["targets"]:
                    runs.append(self.run(root, target, self.rng.uniform(0.0, phase_s[target])))
                    runs[-1]["state"] = self.visible_state(root)
            elif "renames" in spec:
                for _ in range(spec["renames"]):
                    runs.append(self.run(root, at_rename=self.rng.randint(1, 4)))
                    runs[-1]["state"] = self.visible_state(root)
                    if not runs[-1]["killed"]:
                        break
            else:
                for _ in range(spec["random"]):
                    runs.append(self.run(root, None, self.rng.uniform(0.0, 0.8 * total_s)))
                    runs[-1]["state"] = self.visible_state(root)
                    if not runs[-1]["killed"]:
                        break
            temps_before = runs[-1]["state"]["temp_files"] if runs else []
            final = self.run(root)   # the next run completes it
            final["state"] = self.visible_state(root)
            rounds.append({"dir": root, "runs": runs, "final": final, "temp_files_before_final": temps_before})
        return {"reference": reference, "reference_state": self.visible_state(self.plan["reference"]),
                "phase_seconds": phase_s, "rounds": rounds}


def _die_at_rename(n: int, note) -> None:
    """SIGKILL this process at its n-th os.replace / os.rename, before the rename happens."""
    count = 0

    def wrap(real):
        def rename(src, dst, *args, **kwargs):
            nonlocal count
            count += 1
            if count == n:
                note(dst)
                os.kill(os.getpid(), signal.SIGKILL)
                while True:   # never reached (SIGKILL to oneself lands before kill() returns): never rename
                    signal.pause()
            return real(src, dst, *args, **kwargs)
        return rename

    os.replace, os.rename = wrap(os.replace), wrap(os.rename)


def _marks(marker: Path) -> list[dict]:
    # A line being written at the moment of the kill is cut off: only whole lines count.
    return [json.loads(line) for line in marker.read_text().splitlines(keepends=True) if line.endswith("\n")]


def _phase_seconds(marks: list[dict]) -> dict:
    times = {m["step"]: m["t"] for m in marks}
    order = [*STEPS, "done"]
    return {step: times[order[i + 1]] - times[step] for i, step in enumerate(STEPS)}


if __name__ == "__main__":
    print(json.dumps(Driver(json.loads(Path(sys.argv[1]).read_text())).main()))
