"""GET /metrics (dsjax/serve/metrics.py): the counters after known traffic, and ServeMetrics over stand-in stats."""
import json

import prometheus_client
from prometheus_client import parser
import pytest
from starlette.testclient import TestClient

from dsjax.sample import engine as engine_lib
from dsjax.sample import paged_engine
from dsjax.serve import api as serve_api
from dsjax.serve import metrics as metrics_lib
from tests import test_serve
from tests.sample import test_engine

MAX_LEN = test_engine.MAX_LEN
TOKENIZER = test_serve.TOKENIZER
KEY = 'k'
AUTH = {'Authorization': f'Bearer {KEY}'}
PROMPT = test_serve.PROMPT  # greedy continuation: no EOS, so each request gets exactly max_tokens tokens


def scrape(text: str) -> dict[tuple[str, frozenset], float]:
  """(sample name, labels) -> value of a text exposition, parsed by prometheus_client's own parser."""
  return {(s.name, frozenset(s.labels.items())): s.value
          for family in parser.text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
  return samples[(name, frozenset(labels.items()))]


def names(samples: dict) -> set[str]:
  return {name for name, _ in samples}


def usage_of_stream(response) -> dict:
  """The usage of an SSE stream (stream_options.include_usage); asserts it ended with [DONE]."""
  lines = [line[len('data: '):] for line in response.text.splitlines() if line.startswith('data: ')]
  assert lines[-1] == '[DONE]'
  return [json.loads(line) for line in lines[:-1] if json.loads(line).get('usage')][-1]['usage']


@pytest.fixture(scope='module')
def engine():
  """The paged engine (serve.py's default), so its KV-cache metrics are scraped too."""
  model, params, _ = test_engine.shared_model()
  engine = paged_engine.PagedEngine(model, params, num_blocks=32, block_size=4, max_len=MAX_LEN, max_running=2,
                                    max_queue=8, vocab_limit=TOKENIZER.vocab_size)
  yield engine
  engine.shutdown(cancel=True)


def test_metrics_count_what_was_served(engine):
  with TestClient(serve_api.create_app(engine, TOKENIZER, 'tiny', api_key=KEY, max_len=MAX_LEN)) as client:
    before = client.get('/metrics')  # no API key, like /health
    assert before.status_code == 200
    assert before.headers['content-type'] == prometheus_client.CONTENT_TYPE_LATEST
    assert value(scrape(before.text), 'dsjax_requests_finished_total') == 0

    usages, sent = [], {'/v1/completions': 0, '/v1/chat/completions': 0}
    for max_tokens in (3, 5, 8):
      body = dict(model='tiny', prompt=PROMPT, max_tokens=max_tokens, temperature=0)
      response = client.post('/v1/completions', json=body, headers=AUTH)
      assert response.status_code == 200
      usages.append(response.json()['usage'])
      assert usages[-1]['completion_tokens'] == max_tokens
      sent['/v1/completions'] += 1
    for max_tokens in (4, 6):
      body = dict(model='tiny', prompt=PROMPT + '!', max_tokens=max_tokens, temperature=0, stream=True,
                  stream_options={'include_usage': True})
      response = client.post('/v1/completions', json=body, headers=AUTH)
      assert response.status_code == 200
      usages.append(usage_of_stream(response))
      assert usages[-1]['completion_tokens'] == max_tokens
      sent['/v1/completions'] += 1
    for stream in (False, True):
      body = dict(model='tiny', messages=[{'role': 'user', 'content': 'Hi'}], max_tokens=5, temperature=0,
                  stream=stream, stream_options={'include_usage': True})
      response = client.post('/v1/chat/completions', json=body, headers=AUTH)
      assert response.status_code == 200
      usages.append(usage_of_stream(response) if stream else response.json()['usage'])
      assert usages[-1]['completion_tokens'] >= 1  # a first token, for the TTFT count
      sent['/v1/chat/completions'] += 1
    # Refused before the engine: counted by status only.
    assert client.post('/v1/completions', json=dict(model='tiny', prompt=PROMPT)).status_code == 401
    assert client.post('/v1/completions', json=dict(model='tiny', prompt=PROMPT, max_tokens=0),
                       headers=AUTH).status_code == 400

    response = client.get('/metrics')
  assert response.status_code == 200
  samples = scrape(response.text)
  n = len(usages)
  assert value(samples, 'dsjax_requests_finished_total') == n
  assert value(samples, 'dsjax_requests_failed_total') == 0
  assert value(samples, 'dsjax_generation_tokens_total') == sum(u['completion_tokens'] for u in usages)
  assert value(samples, 'dsjax_prompt_tokens_total') == sum(u['prompt_tokens'] for u in usages)
  assert value(samples, 'dsjax_queue_depth') == 0
  assert value(samples, 'dsjax_running_requests') == 0
  assert value(samples, 'dsjax_engine_steps_total') >= max(u['completion_tokens'] for u in usages) - 1
  assert value(samples, 'dsjax_speculative_proposed_total') == 0
  assert value(samples, 'dsjax_engine_restarts_total') == 0
  # The paged engine's cache: all blocks free again, every prompt looked up once, and the second and third
  # identical prompts found (at least) the full blocks of all but their last token cached.
  assert value(samples, 'dsjax_kv_blocks') == 32 and value(samples, 'dsjax_kv_blocks_used') == 0
  assert value(samples, 'dsjax_kv_blocks_free') == 32
  assert value(samples, 'dsjax_prefix_cache_queried_tokens_total') == sum(u['prompt_tokens'] for u in usages)
  assert value(samples, 'dsjax_prefix_cache_hit_tokens_total') >= 2 * (usages[0]['prompt_tokens'] - 1) // 4 * 4
  assert value(samples, 'dsjax_preemptions_total') == 0
  assert value(samples, 'dsjax_generation_tokens_per_second') > 0
  assert value(samples, 'dsjax_time_to_first_token_seconds_count') == n
  assert value(samples, 'dsjax_e2e_request_latency_seconds_count') == n
  assert value(samples, 'dsjax_time_per_output_token_seconds_count') == sum(u['completion_tokens'] >= 2
                                                                              for u in usages)
  assert 0 < value(samples, 'dsjax_time_to_first_token_seconds_sum') < value(
      samples, 'dsjax_e2e_request_latency_seconds_sum')
  assert value(samples, 'dsjax_time_to_first_token_seconds_bucket', le='+Inf') == n
  for endpoint, count in sent.items():
    assert value(samples, 'dsjax_http_requests_total', endpoint=endpoint, status='200') == count
  assert value(samples, 'dsjax_http_requests_total', endpoint='/v1/completions', status='401') == 1
  assert value(samples, 'dsjax_http_requests_total', endpoint='/v1/completions', status='400') == 1


class FakeEngine:
  """Stands in for the engine's stats() (the data source), so that the metrics built from it can be checked."""

  def __init__(self, **stats: int):
    self.values = dict(stats)

  def stats(self) -> dict[str, int]:
    return dict(self.values)


BASE = dict(active=2, pending=3, steps=40, finished_requests=7, failed_requests=1, prompt_tokens=90,
            generated_tokens=0, proposed=12, accepted=9, restarts=0)
PAGED = dict(kv_blocks_total=64, kv_blocks_used=20, kv_blocks_free=44, kv_blocks_cached=6,
             prefix_queried_tokens=400, prefix_hit_tokens=100, preemptions=2)


def render(metrics: metrics_lib.ServeMetrics) -> dict:
  body, content_type = metrics.render()
  assert content_type == prometheus_client.CONTENT_TYPE_LATEST
  return scrape(body.decode())


def test_engine_stats_become_gauges_and_counters():
  samples = render(metrics_lib.ServeMetrics(FakeEngine(**BASE, **PAGED)))
  expected = {'dsjax_queue_depth': 3, 'dsjax_running_requests': 2, 'dsjax_engine_steps_total': 40,
              'dsjax_requests_finished_total': 7, 'dsjax_requests_failed_total': 1, 'dsjax_prompt_tokens_total': 90,
              'dsjax_generation_tokens_total': 0, 'dsjax_speculative_proposed_total': 12,
              'dsjax_speculative_accepted_total': 9, 'dsjax_engine_restarts_total': 0,
              'dsjax_kv_blocks': 64, 'dsjax_kv_blocks_used': 20, 'dsjax_kv_blocks_free': 44,
              'dsjax_kv_blocks_cached': 6, 'dsjax_prefix_cache_queried_tokens_total': 400,
              'dsjax_prefix_cache_hit_tokens_total': 100, 'dsjax_prefix_cache_hit_rate': 0.25,
              'dsjax_preemptions_total': 2}
  assert {name: value(samples, name) for name in expected} == expected
  types = {f.name: f.type for f in parser.text_string_to_metric_families(metrics_lib.ServeMetrics(
      FakeEngine(**BASE, **PAGED)).render()[0].decode())}
  assert types['dsjax_kv_blocks_used'] == 'gauge' and types['dsjax_preemptions'] == 'counter'

  no_queries = render(metrics_lib.ServeMetrics(FakeEngine(**BASE, **{**PAGED, 'prefix_queried_tokens': 0,
                                                                     'prefix_hit_tokens': 0})))
  assert value(no_queries, 'dsjax_prefix_cache_hit_rate') == 0

  plain = names(render(metrics_lib.ServeMetrics(FakeEngine(**BASE))))
  assert 'dsjax_queue_depth' in plain
  assert not [name for name in plain if name.startswith(('dsjax_kv_', 'dsjax_prefix_', 'dsjax_preemptions'))]


def test_stats_are_read_at_each_scrape_and_the_token_rate_uses_a_window():
  engine = FakeEngine(**BASE)
  times = iter([0.0, 4.0, 8.0, 15.0, 40.0])  # the first: when ServeMetrics is built
  metrics = metrics_lib.ServeMetrics(engine, clock=lambda: next(times))
  rates = []
  for tokens, pending in ((40, 3), (60, 1), (130, 0), (130, 0)):
    engine.values.update(generated_tokens=tokens, pending=pending)
    samples = render(metrics)
    assert value(samples, 'dsjax_generation_tokens_total') == tokens
    assert value(samples, 'dsjax_queue_depth') == pending
    rates.append(value(samples, 'dsjax_generation_tokens_per_second'))
  # t=4: 40/4 since the start; t=8: 60/8 (no sample is 10 s old yet); t=15: from the t=4 scrape, the newest at
  # least 10 s old, (130-40)/11; t=40: from the t=15 scrape, nothing generated since.
  assert rates == pytest.approx([10.0, 7.5, 90 / 11, 0.0])


def test_finished_requests_fill_the_latency_histograms():
  metrics = metrics_lib.ServeMetrics(FakeEngine(**BASE))

  def request(tokens, first, finished):
    return engine_lib.Request(id=0, prompt_ids=[1], max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0,
                              stop_ids=frozenset(), seed=0, tokens=list(tokens), submitted_at=10.0,
                              first_token_at=first, finished_at=finished)

  metrics.observe_finished(request([5, 6, 7, 8, 9], first=10.5, finished=12.0))  # TPOT (12 - 10.5) / 4
  metrics.observe_finished(request([5], first=10.03, finished=10.2))  # one token: no TPOT
  metrics.observe_finished(request([], first=None, finished=13.0))  # cancelled in the queue: latency only
  samples = render(metrics)
  assert value(samples, 'dsjax_time_to_first_token_seconds_count') == 2
  assert value(samples, 'dsjax_time_to_first_token_seconds_sum') == pytest.approx(0.53)
  assert value(samples, 'dsjax_time_to_first_token_seconds_bucket', le='0.04') == 1
  assert value(samples, 'dsjax_time_to_first_token_seconds_bucket', le='0.5') == 2
  assert value(samples, 'dsjax_time_per_output_token_seconds_count') == 1
  assert value(samples, 'dsjax_time_per_output_token_seconds_sum') == pytest.approx(0.375)
  assert value(samples, 'dsjax_time_per_output_token_seconds_bucket', le='0.3') == 0
  assert value(samples, 'dsjax_time_per_output_token_seconds_bucket', le='0.4') == 1
  assert value(samples, 'dsjax_e2e_request_latency_seconds_count') == 3
  assert value(samples, 'dsjax_e2e_request_latency_seconds_sum') == pytest.approx(2.0 + 0.2 + 3.0)
  # Apps do not share a registry.
  assert value(render(metrics_lib.ServeMetrics(FakeEngine(**BASE))), 'dsjax_e2e_request_latency_seconds_count') == 0
