"""hashsearch serve: an HTTP search service and a web page over one collection (the `serve` extra)."""
