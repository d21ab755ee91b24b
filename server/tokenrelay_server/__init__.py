"""tokenrelay: a gRPC gateway that makes LLM token streams survive failure."""

__version__ = "0.1.0"
