"""Graph: the index's region vectors enter; a mutual k-NN region graph, Katz centrality, query-time
diffusion and the OS.EGM discovered regions (object saliency) leave, versioned beside the index.
"""
