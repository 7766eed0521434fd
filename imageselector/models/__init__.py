"""The five vision models, shared by embedding, search and evaluation: registry, encoders, preprocessing, stand-ins."""
