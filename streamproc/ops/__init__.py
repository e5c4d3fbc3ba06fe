"""Operations: the HTTP endpoints (``/metrics``, ``/healthz``, ``/readyz``), the Prometheus
collector behind them, and logging."""

from __future__ import annotations

from .http import OpsServer
from .logs import configure_logging

__all__ = ["OpsServer", "configure_logging"]
