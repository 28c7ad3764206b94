"""The continuous-batching engine against `Sampler.generate` of each prompt alone."""
import functools
import threading
import time

import jax
import jax.numpy as jnp
import pytest

from dsjax.model import Transformer
from dsjax.sample import engine as engine_lib
from dsjax.sample import sampler as sampler_lib
from dsjax.sample import speculative
from tests.model import helpers

MAX_LEN = 48
VOCAB_LIMIT = 259  # the byte tokenizer's ids


def tiny_model(seed: int = 1):
  """A random 2-layer model with a byte-tokenizer-sized vocabulary (384, padded)."""
  cfg = helpers.tiny_config('full', vocab_size=384)
  model = Transformer(cfg)
  shapes = helpers.init_shapes(model, jnp.zeros((1, 8), jnp.int32), jnp.arange(8, dtype=jnp.int32)[None])
  return model, helpers.random_like(shapes, seed=seed, std=0.5)


class Reference:
  """Sampler.generate of one prompt at a time, memoized (each new shape compiles)."""

  def __init__(self, model, params, max_len):
    self.sampler, self.params, self.memo = sampler_lib.Sampler(model, max_len=max_len), params, {}

  def __call__(self, prompt, max_new, seed=0, **settings):
    key = (tuple(prompt), max_new, seed, tuple(sorted(settings.items())))
    if key not in self.memo:
      self.memo[key] = self.sampler.generate(self.params, [prompt], jax.random.key(seed), max_new_tokens=max_new,
                                             vocab_limit=VOCAB_LIMIT, **settings)[0]
    return self.memo[key]


@functools.cache
def shared_model():
  """(model, params, reference) shared with tests/test_serve.py, so reference compiles are reused."""
  model, params = tiny_model()
  return model, params, Reference(model, params, MAX_LEN)


@pytest.fixture(scope='module')
def setup():
  model, params, reference = shared_model()
  engine = engine_lib.Engine(model, params, num_slots=3, max_len=MAX_LEN, max_queue=16, vocab_limit=VOCAB_LIMIT)
  yield model, params, engine, reference
  engine.shutdown(cancel=True)


def prompt_of(length, offset=0):
  return [(7 * i + 3 + offset) % 256 for i in range(length)]


@pytest.mark.slow  # over 30 s on 2 cores (2026-12-02)
def test_concurrent_requests_of_different_lengths_match_unbatched_greedy(setup):
  _, _, engine, reference = setup
  # More requests than slots; prompts across the 8/16/32 buckets; the last one runs into max_len.
  lengths = [5, 12, 20, 5, MAX_LEN - 4]
  prompts = [prompt_of(n, offset=i) for i, n in enumerate(lengths)]
  requests = [None] * len(prompts)

  def client(i):
    requests[i] = engine.submit(prompts[i], 10, stop_ids=[])

  threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  results = [r.result(timeout=120) for r in requests]
  for prompt, got, request in zip(prompts, results, requests):
    max_new = min(10, MAX_LEN - len(prompt))
    assert got == reference(prompt, max_new), len(prompt)
    assert request.finish_reason == 'length' and len(got) == max_new
  assert list(requests[1]) == results[1]  # the streamed tokens are the result


def test_stop_ids_end_a_request_and_are_dropped(setup):
  _, _, engine, reference = setup
  prompt = prompt_of(5, offset=1)
  full = reference(prompt, 10)
  stop = full[3]
  request = engine.submit(prompt, 10, stop_ids=[stop, 999])
  assert request.result(timeout=60) == full[:full.index(stop)]
  assert request.finish_reason == 'stop'


def test_sampling_matches_sampler_with_the_same_seed(setup):
  _, _, engine, reference = setup
  prompt = prompt_of(12, offset=2)
  settings = dict(temperature=1.0, top_k=50, top_p=0.9)
  got = [engine.submit(prompt, 10, seed=seed, **settings) for seed in (3, 4)]
  assert got[0].result(60) == reference(prompt, 10, seed=3, **settings)
  assert got[0].result() != got[1].result()


def test_invalid_requests_raise_value_error(setup):
  engine = setup[2]
  for args, kwargs in [(([], 4), {}), (([1] * MAX_LEN, 4), {}), (([1], 0), {}), (([1], 4), dict(top_p=0.0)),
                       (([1], 4), dict(temperature=-1.0))]:
    with pytest.raises(ValueError):
      engine.submit(*args, **kwargs)


def test_queue_full_and_shutdown_with_cancel_does_not_hang():
  model, params = tiny_model()
  engine = engine_lib.Engine(model, params, num_slots=1, max_len=MAX_LEN, max_queue=1, vocab_limit=VOCAB_LIMIT)
  first = engine.submit(prompt_of(4), MAX_LEN - 4)
  second = engine.submit(prompt_of(3), MAX_LEN - 3)
  with pytest.raises(engine_lib.QueueFull):
    engine.submit(prompt_of(2), 4)
  start = time.perf_counter()
  engine.shutdown(cancel=True)
  assert time.perf_counter() - start < 30
  assert first.wait(0) and second.wait(0)
  assert second.finish_reason == 'cancelled' and first.finish_reason in ('cancelled', 'length')
  assert list(second) == second.tokens  # iteration ends
  with pytest.raises(engine_lib.EngineClosed):
    engine.submit(prompt_of(2), 4)
  engine.shutdown()  # idempotent


def test_shutdown_without_cancel_finishes_requests(setup):
  model, params, _, reference = setup
  engine = engine_lib.Engine(model, params, num_slots=2, max_len=MAX_LEN, vocab_limit=VOCAB_LIMIT)
  prompts = [prompt_of(5, offset=i) for i in range(3)]
  requests = [engine.submit(p, 10) for p in prompts]
  engine.shutdown(cancel=False, timeout=120)
  assert [r.finish_reason for r in requests] == ['length'] * 3
  assert requests[0].tokens == reference(prompts[0], 10)


@pytest.mark.parametrize('drafter_kind', ['lookup', pytest.param('model', marks=pytest.mark.slow)])
def test_speculative_engine_matches_greedy_and_speculative_sampling(drafter_kind):
  """Speculative rounds inside the engine: greedy requests equal plain greedy decoding of each prompt alone, and a
  seeded sampled request equals `speculative_generate` of its prompt alone with the same seed and drafter."""
  model, params, reference = shared_model()
  if drafter_kind == 'lookup':
    drafter = speculative.PromptLookupDrafter()
  else:
    draft_model, draft_params = tiny_model(seed=5)
    drafter = speculative.ModelDrafter(sampler_lib.Sampler(draft_model, max_len=MAX_LEN), draft_params)
  engine = engine_lib.Engine(model, params, num_slots=3, max_len=MAX_LEN, vocab_limit=VOCAB_LIMIT, drafter=drafter,
                             gamma=3)
  try:
    lengths = [5, 12, 20, 1, MAX_LEN - 4]  # a 1-token prompt; the last runs into max_len
    prompts = [prompt_of(n, offset=i) for i, n in enumerate(lengths)]
    stop = reference(prompts[0], 10)[4]
    requests = [engine.submit(p, 10, stop_ids=[stop] if i == 0 else []) for i, p in enumerate(prompts)]
    settings = dict(temperature=1.0, top_k=50, top_p=0.9)
    sampled_prompt = prompt_of(12, offset=2)
    sampled = engine.submit(sampled_prompt, 10, seed=3, **settings)
    for i, (prompt, request) in enumerate(zip(prompts, requests)):
      expected = reference(prompt, min(10, MAX_LEN - len(prompt)))
      if i == 0:
        expected = expected[:4]
      assert request.result(timeout=120) == expected, i
    assert requests[0].finish_reason == 'stop' and requests[-1].finish_reason == 'length'
    target = sampler_lib.Sampler(model, max_len=MAX_LEN, extra_slots=4)
    alone, _ = speculative.speculative_generate(target, params, drafter, [sampled_prompt], jax.random.key(3),
                                                max_new_tokens=10, gamma=3, vocab_limit=VOCAB_LIMIT, **settings)
    assert sampled.result(timeout=120) == alone[0]
    stats = engine.stats()
    assert stats['proposed'] > 0 and 0 <= stats['accepted'] <= stats['proposed']
  finally:
    engine.shutdown(cancel=True)
