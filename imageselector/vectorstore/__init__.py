"""The embedding vector store: immutable segments + manifest per model, its read and write contracts, migration, export."""
