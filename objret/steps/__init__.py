"""Steps: a work folder (objret.steps.workspace.Workspace) and params enter; each stage's function runs the
library over it (ingest, features, regions, whitening, index, graph, discovery, mine, dataset) and records what it did.
"""
