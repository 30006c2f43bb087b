"""optreg on a Ray cluster (`optreg serve --ray`): session hosts as detached Ray actors, each session
owned by one host at a time through an owner epoch in shared storage, and gRPC front ends that serve
the same optreg.v1 contract and route each call to the session's owner. Design: docs/scale-out.md.

Modules: ownership (the epoch compare-and-swap), fenced (the journal that checks it before every
write), wire (a session id out of raw request bytes), context (a servicer context inside an actor),
host (the actor), feed (a client stream forwarded as it arrives), telemetry (telemetry per host),
directory (hosts, placement, listing, draining), frontend (the gRPC side), serve (the command)."""
