"""Observers of the engine (engine/events.py): metrics, traces, logs and
error statistics. The layer sits between the engine and the gRPC edge: it
reads engine events and state, and the edge (api/server.py) wires it."""
