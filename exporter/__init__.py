"""Everything that shows results: /metrics, the health endpoints and the status page."""
