"""Observability: what the gateway tells operators (issue 11).

Above the engine, below the gRPC edge: every part here is an engine observer
(engine/events.py) or something the edge installs (a gRPC interceptor), and
the engine never imports it.

    tracing   OpenTelemetry spans of the calls, the streams, the attempts and
              the recovery actions; exporters (none, console, OTLP/gRPC)
    logs      one log line per stream lifecycle event; text or JSON lines;
              the loggers that could print a secret kept quiet
    live      the per-chunk counts: chunks, tokens, gaps, recovery latency,
              recent rates and recovery actions (metrics and Admin read them)
    metrics   Prometheus: counters of events, a collector of state, /metrics
    state     breaker states and usable chain entries, read from the hub
    error_recorder  classified errors into the error statistics (store/)
    breaker_log     one warning when a breaker opens (a breaker listener)
"""
