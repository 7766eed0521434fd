"""Embedding: the model registry, encoders, stand-in models, the crash-consistent FAISS store, the embed stage."""
