"""Etsy Open API v3 access: client, pacing, crawl, the CDN URL pattern, and a local simulator for tests/offline runs."""
