"""Observability over a running corral: Prometheus metrics (observe/metrics.py), fed by the runtime's
event and finding hooks; never on the path of a decision."""

from corral.observe.metrics import Metrics

__all__ = ["Metrics"]
