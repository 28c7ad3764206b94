"""Prometheus metrics of the server (GET /metrics), one `ServeMetrics` per app with its own registry.

At scrape time a collector reads `engine.stats()`: queue depth and running requests (gauges), engine steps,
finished / failed requests, prompt and generated tokens, speculative drafts proposed / accepted and engine restarts
(counters), and, when the engine reports them (the paged engine), KV block gauges, prefix-cache token counters with
their hit rate, and preemptions. A key missing from the stats is a metric left out, never a zero.
`dsjax_generation_tokens_per_second` is the generated-token rate over the last RATE_WINDOW_S seconds of scrapes: from
the newest earlier scrape at least that old (so with scrapes further apart: since the previous scrape; at the first
scrape: since the app was built) to now.
Per finished request (`observe_finished`): histograms of time to first token, time per output token after the first,
and end-to-end latency. Per HTTP response of the generation endpoints (`count_http`): a counter by endpoint and
status (a stream counts its 200 when it starts; an error inside the stream does not change it).
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable, Iterator, Protocol

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dsjax.sample import engine as engine_lib

RATE_WINDOW_S = 10.0  # dsjax_generation_tokens_per_second: the window of scrapes the rate is taken over
HTTP_ENDPOINTS = ('/v1/completions', '/v1/chat/completions')  # the paths dsjax_http_requests_total counts

# (engine.stats() key, metric name, help). Counter names are given without `_total`, which the exposition adds.
GAUGES = (
    ('pending', 'dsjax_queue_depth', 'Requests waiting for a decode slot.'),
    ('active', 'dsjax_running_requests', 'Requests in decode slots.'),
    ('kv_blocks_total', 'dsjax_kv_blocks', 'KV cache blocks in the pool (paged engine).'),
    ('kv_blocks_used', 'dsjax_kv_blocks_used', 'KV cache blocks held by running requests (paged engine).'),
    ('kv_blocks_free', 'dsjax_kv_blocks_free', 'KV cache blocks free to allocate (paged engine).'),
    ('kv_blocks_cached', 'dsjax_kv_blocks_cached', 'KV cache blocks kept for prefix reuse (paged engine).'),
)
COUNTERS = (
    ('steps', 'dsjax_engine_steps', 'Engine decode steps (or speculative rounds).'),
    ('finished_requests', 'dsjax_requests_finished', 'Requests finished, for any reason.'),
    ('failed_requests', 'dsjax_requests_failed', 'Requests finished with an error.'),
    ('prompt_tokens', 'dsjax_prompt_tokens', 'Prompt tokens of admitted requests.'),
    ('generated_tokens', 'dsjax_generation_tokens', 'Tokens generated and handed to requests.'),
    ('proposed', 'dsjax_speculative_proposed', 'Draft tokens proposed by speculative decoding.'),
    ('accepted', 'dsjax_speculative_accepted', 'Draft tokens accepted by speculative decoding.'),
    ('restarts', 'dsjax_engine_restarts', 'Engine device-state rebuilds after failures.'),
    ('prefix_queried_tokens', 'dsjax_prefix_cache_queried_tokens', 'Prompt tokens looked up in the prefix cache.'),
    ('prefix_hit_tokens', 'dsjax_prefix_cache_hit_tokens', 'Prompt tokens found in the prefix cache.'),
    ('preemptions', 'dsjax_preemptions', 'Running requests preempted to free KV blocks.'),
)
# Seconds. TTFT includes the queue wait and the prefill (and its first compile); TPOT is one decode step or less.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0)


class StatsSource(Protocol):
  """What the metrics read from the engine: engine_lib.Engine, or the paged engine."""

  def stats(self) -> dict[str, Any]: ...


class TokenRate:
  """Generated tokens per second over a sliding window of samples (time, total tokens) taken at scrapes."""

  def __init__(self, now: float, total: float, window: float = RATE_WINDOW_S):
    self.window = window
    self._samples: collections.deque[tuple[float, float]] = collections.deque([(now, total)])
    self._lock = threading.Lock()  # concurrent scrapes

  def update(self, now: float, total: float) -> float:
    """Records a sample; the rate from the newest earlier sample at least `window` old (else the oldest) to it."""
    with self._lock:
      while len(self._samples) >= 2 and self._samples[1][0] <= now - self.window:
        self._samples.popleft()
      then, before = self._samples[0]
      self._samples.append((now, total))
      return max(0.0, (total - before) / (now - then)) if now > then else 0.0


class EngineCollector(Collector):
  """Reads `engine.stats()` at each scrape (nothing is cached between scrapes)."""

  def __init__(self, engine: StatsSource, clock: Callable[[], float] = time.monotonic):
    self.engine, self.clock = engine, clock
    self.rate = TokenRate(clock(), float(engine.stats().get('generated_tokens', 0)))

  def collect(self) -> Iterator[Metric]:
    stats = self.engine.stats()
    for key, name, doc in GAUGES:
      if key in stats:
        yield GaugeMetricFamily(name, doc, value=float(stats[key]))
    for key, name, doc in COUNTERS:
      if key in stats:
        yield CounterMetricFamily(name, doc, value=float(stats[key]))
    if 'prefix_queried_tokens' in stats and 'prefix_hit_tokens' in stats:
      queried = float(stats['prefix_queried_tokens'])
      yield GaugeMetricFamily('dsjax_prefix_cache_hit_rate', 'Prefix-cache hit tokens / queried tokens (0: none).',
                              value=float(stats['prefix_hit_tokens']) / queried if queried else 0.0)
    if 'generated_tokens' in stats:
      rate = self.rate.update(self.clock(), float(stats['generated_tokens']))
      yield GaugeMetricFamily('dsjax_generation_tokens_per_second',
                              f'Generated tokens per second over the last {RATE_WINDOW_S:g} s of scrapes.', value=rate)


class ServeMetrics:
  """The metrics of one app: its own CollectorRegistry (several apps may live in one process)."""

  def __init__(self, engine: StatsSource, clock: Callable[[], float] = time.monotonic):
    self.registry = prometheus_client.CollectorRegistry()
    self.registry.register(EngineCollector(engine, clock))
    self.ttft = prometheus_client.Histogram(
        'dsjax_time_to_first_token_seconds', 'Seconds from submission to the first generated token.',
        buckets=TTFT_BUCKETS, registry=self.registry)
    self.tpot = prometheus_client.Histogram(
        'dsjax_time_per_output_token_seconds', 'Seconds per generated token after the first (requests with >= 2).',
        buckets=TPOT_BUCKETS, registry=self.registry)
    self.e2e = prometheus_client.Histogram(
        'dsjax_e2e_request_latency_seconds', 'Seconds from submission to the end of the request, for any reason.',
        buckets=E2E_BUCKETS, registry=self.registry)
    self.http = prometheus_client.Counter(
        'dsjax_http_requests', 'HTTP responses of the generation endpoints, by endpoint and status.',
        ['endpoint', 'status'], registry=self.registry)

  def observe_finished(self, request: engine_lib.Request) -> None:
    """Records a request that has finished (any finish_reason). Thread-safe: called from the engine thread."""
    end = request.finished_at if request.finished_at is not None else time.perf_counter()
    self.e2e.observe(max(0.0, end - request.submitted_at))
    if request.first_token_at is None:
      return
    self.ttft.observe(max(0.0, request.first_token_at - request.submitted_at))
    if len(request.tokens) >= 2:
      self.tpot.observe(max(0.0, end - request.first_token_at) / (len(request.tokens) - 1))

  def count_http(self, endpoint: str, status: int) -> None:
    self.http.labels(endpoint=endpoint, status=str(status)).inc()

  def render(self) -> tuple[bytes, str]:
    """(the text exposition, its content type)."""
    return prometheus_client.generate_latest(self.registry), prometheus_client.CONTENT_TYPE_LATEST
