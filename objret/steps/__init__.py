"""Steps: a work folder (objret.steps.workspace.Workspace) and its params enter; each stage's step runs the library over
it, and what leaves is that stage's artifacts in the folder (lake, cache, regions, index, graph, runs, dataset).
"""
