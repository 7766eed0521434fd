"""imageselector: a visual search engine over Etsy's catalogue, built as a crash-safe pipeline."""

__version__ = "0.1.0"
