"""Development tools that ship beside the gateway but are never imported by
it: the mock upstream (the simulator over real HTTP), the chaos runner, the
demo and the TCP fault proxy."""
