"""optreg's server: sessions, the gRPC servicers, the `optreg` command."""
