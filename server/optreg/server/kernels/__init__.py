"""The kernels layer: an optimizer's update over a tensor, compiled once per (definition, dtype).

The JIT cache (jit.py), the update pass (apply.py) with its statistics (stats.py) and widening
(widen.py), the finite check (finite.py), row catch-up (rows.py). Imports only the model; see
docs/architecture.md."""
