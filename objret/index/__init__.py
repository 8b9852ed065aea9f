"""Index: encoded region vectors with their frame ids and boxes enter; a faiss index (flat, IVF-PQ, HNSW)
leaves, answering 'which frames hold a region near this vector' with the frame's best region.
"""
