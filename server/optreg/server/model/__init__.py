"""The model layer: plain data (sessions and their arrays, worker config, refusals, the memory budget).

No gRPC and no compute, so every layer above can use it; see docs/architecture.md."""
