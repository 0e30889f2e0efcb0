"""Prometheus metrics of the edge daemon (prometheus-client), on a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class EdgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("rise_edge_queue_depth", "Requests waiting for the large model", registry=r)
        self.active = Gauge("rise_edge_active_requests", "Requests in the large model's steps", registry=r)
        self.connections = Gauge("rise_edge_connections", "Open websocket connections", registry=r)
        self.batch_requests = Histogram("rise_edge_batch_requests", "Requests per UNet call",
                                        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.batch_rows = Histogram("rise_edge_batch_rows", "UNet batch rows per call (2 per guided request)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.stage_seconds = Histogram("rise_edge_stage_seconds", "Latency per stage", ["stage"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("rise_edge_requests", "Requests served per relay configuration",
                                ["steps", "split", "sampler", "decode_on"], registry=r)
        self.errors = Counter("rise_edge_errors", "Errors sent, by code", ["code"], registry=r)
        self.reports = Counter("rise_edge_reports", "Device reports received", registry=r)
        self.ratings = Counter("rise_edge_ratings", "User ratings received (in reports or later)", ["rating"],
                               registry=r)

    def observe_batch(self, requests: int, rows: int) -> None:
        """One UNet call of ``requests`` requests and ``rows`` rows (an engine's ``on_batch``; thread-safe)."""
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP on a background thread."""
        start_http_server(port, addr=host, registry=self.registry)
