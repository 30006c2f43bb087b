"""The telemetry layer: what steps leave behind (the per-session ring, Prometheus metrics)."""
