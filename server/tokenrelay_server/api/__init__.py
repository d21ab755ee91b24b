"""The gRPC edge: the `Relay` servicer (protobuf in and out), resume tokens,
and `RelayServer`, which assembles a gateway on a real port."""
