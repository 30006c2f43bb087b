"""The steps layer: one step from its gradients to its commit, for every source.

The step run (run.py), the commit, replay (replay.py), sparse rows, shared memory and resident
sessions, shared sessions' rounds, writer leases; see docs/architecture.md, "The path of a step"."""
