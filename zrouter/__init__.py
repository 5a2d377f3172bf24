"""zrouter: shared pieces of the broker, worker and client (wire protocol, errors, discovery)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
