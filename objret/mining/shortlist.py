"""One query through candidate selection and ranking: the path ``objret mine`` and ``objret eval`` both take.

Candidates: the ``mining.rerank`` frames whose best region is nearest the query's region vector in the region
index (faiss), or every indexed frame when the method needs it (``discovery``: one cheap score a frame) or the
query box covers under ``mining.small_box`` of its frame and the method matches templates there (``fused``:
region descriptors cannot shortlist objects of a few cells). The query's own frame is never a candidate.
The chosen method (objret.mining.methods) then ranks the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from objret.config import MiningParams
from objret.errors import ObjretError
from objret.graph.diffusion import GraphDiffusion
from objret.mining.evidence import Ranking, query_region_vector
from objret.mining.methods import Method, RankInputs, get_method
from objret.mining.query import QueryObject
from objret.mining.search import LakeSearch


@dataclass
class QueryRanking:
    ranking: Ranking          # the candidate frames (and, when every frame is a candidate, the query's own)
    candidates: int           # frames mined: the query's own frame never is
    vector: np.ndarray        # the query's region vector (the shortlist's key)
    diffusion_solve: object | None = None   # objret.graph.centrality's CG solve, when diffusion was fused


def is_small(query: QueryObject, small_box: float) -> bool:
    width, height = query.image_size
    return query.box[2] * query.box[3] < small_box * width * height


def candidate_rows(search: LakeSearch, method: Method, query: QueryObject, vector: np.ndarray,
                   mining: MiningParams) -> np.ndarray:
    """Rows of ``search`` to rank for ``query`` (see the module's docstring)."""
    if method.every_frame or (method.small_box_every_frame and is_small(query, mining.small_box)):
        return search.rows(exclude=query.frame_id)
    return search.shortlist(vector, mining.rerank, exclude=query.frame_id)


def rank_query(search: LakeSearch, query: QueryObject, method_name: str, mining: MiningParams, *, gem_p: float,
               keep_heatmaps: int = 0, diffusion: GraphDiffusion | None = None) -> QueryRanking:
    """Candidates for ``query`` ranked by the method ``method_name``; ``diffusion`` (fused only) adds the query's
    diffusion over the region graph as evidence."""
    method = get_method(method_name)
    vector = query_region_vector(query, search.maps.regions)
    rows = candidate_rows(search, method, query, vector, mining)
    if not len(rows):
        raise ObjretError("the index holds no frame to mine besides the query: ingest a lake first")
    candidates = len(rows)
    if candidates == len(search.frame_ids) - (query.frame_id in search.row_of):
        # Every frame: rank the resident lake as it is (a subset would gather every map again); the caller
        # drops the query's own frame from the ranking.
        rows = np.arange(len(search.frame_ids))
    lake = search.maps if len(rows) == len(search.frame_ids) else search.maps.subset(rows)
    scores = solve = None
    if diffusion is not None:
        if method.name != "fused":
            raise ObjretError(f"diffusion evidence is fused by the fused method only, not {method.name!r}")
        scores, solve = diffusion.scores(vector, search.graph_rows(diffusion)[rows])
    ranking = method.rank(query, lake, RankInputs(mining, gem_p, keep_heatmaps, scores))
    return QueryRanking(ranking, candidates, vector, solve)
