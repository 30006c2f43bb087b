"""optreg's server, in layers lowest first: model, kernels, storage, steps, sessions, telemetry, rpc,
dashboard, assembly, cluster, cli. Imports point down or across, never up (tests/server/test_layers.py);
docs/architecture.md draws the layers, the path of a step and where each concern lives."""
