"""Eval: a labelled bench (sets + fixed queries) and the mining path enter; per-query rankings, mAP,
Recall@K, Loc@10 by query kind and box size, and their plots leave.
"""
