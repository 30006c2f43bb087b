"""The rpc layer: the gRPC servicers as adapters (decode, one call into steps/ or sessions/, encode),
the status table, auth, admission limits, reflection; see docs/architecture.md."""
