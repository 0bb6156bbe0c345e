"""Prometheus metrics of the teacher server (own registry; served on an explicit address)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from teacher_server.config import split_address

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BYTE_BUCKETS = tuple(float(4 ** i) for i in range(5, 17))  # 1 KiB .. 4 GiB
_FILL_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Metrics:
  """All server metrics. ``rate(teacher_tokens_total[1m])`` is the served tokens/s."""

  def __init__(self, registry: CollectorRegistry | None = None):
    self.registry = registry or CollectorRegistry()
    r = self.registry
    self.requests = Counter("teacher_requests", "Requests answered, by method and status code.",
                            ["method", "code"], registry=r)
    self.errors = Counter("teacher_errors", "Requests answered with an error, by status code.",
                          ["code"], registry=r)
    self.tokens = Counter("teacher_tokens", "Tokens (B * T) of successfully answered requests.", registry=r)
    self.latency = Histogram("teacher_request_latency_seconds", "Time from accepting a request to "
                             "its answer.", ["method"], buckets=_LATENCY_BUCKETS, registry=r)
    self.queue_depth = Gauge("teacher_queue_depth", "Requests waiting for the batcher.", registry=r)
    self.batch_fill = Histogram("teacher_batch_fill_ratio", "Real tokens / bucket tokens of each "
                                "engine batch.", buckets=_FILL_BUCKETS, registry=r)
    self.batches = Counter("teacher_batches", "Engine batches run, by bucket.", ["bucket"], registry=r)
    self.engine_seconds = Histogram("teacher_engine_seconds", "Engine time per batch (forward, top-k, "
                                    "transfer).", buckets=_LATENCY_BUCKETS, registry=r)
    self.host_bytes = Histogram("teacher_engine_host_bytes", "Bytes copied from the accelerator to the "
                                "host per engine batch (only what its requests asked for).",
                                buckets=_BYTE_BUCKETS, registry=r)
    self.state_tokens = Counter("teacher_state_tokens", "Tokens whose layer states were sent, by state "
                                "name and layer.", ["state", "layer"], registry=r)
    self.open_streams = Gauge("teacher_open_streams", "Open Stream calls.", registry=r)
    self.malformed = Counter("teacher_malformed_requests", "Request messages that did not parse, by method.",
                             ["method"], registry=r)
    self.abandoned = Counter("teacher_abandoned_requests", "Requests of cancelled calls (client gone, "
                             "timed out or reconnecting) dropped before the engine ran them.", registry=r)
    self.stream_held_bytes = Gauge("teacher_stream_held_bytes", "Estimated answer bytes that open streams "
                                   "hold: requested, being computed or not yet sent.", registry=r)
    self.compilations = Gauge("teacher_engine_compilations", "Compiled engine variants (constant after "
                              "warm-up; a rise means a recompilation).", registry=r)

  def record(self, method: str, code: str, latency_s: float, tokens: int = 0) -> None:
    """Counts one answered request (``code`` is a grpc.StatusCode name, e.g. ``OK``)."""
    self.requests.labels(method, code).inc()
    self.latency.labels(method).observe(latency_s)
    if code == "OK":
      self.tokens.inc(tokens)
    else:
      self.errors.labels(code).inc()

  def count_states(self, names, layers, tokens: int) -> None:
    """Counts `tokens` positions answered with each (state, layer) pair."""
    for name in names:
      for layer in layers:
        self.state_tokens.labels(name, str(layer)).inc(tokens)

  def serve(self, address: str):
    """Starts the /metrics HTTP endpoint on ``host:port``; returns (server, thread)."""
    host, port = split_address(address, "metrics_address")
    return start_http_server(port, addr=host, registry=self.registry)
