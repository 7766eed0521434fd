"""The download stage: CDN photos -> images/ files."""
