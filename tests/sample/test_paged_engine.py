"""The paged engine against each prompt decoded alone (`Sampler.generate`, `speculative_generate`): concurrent
requests of long and short prompts, shared prefixes (hits and misses), preemption forced by a tiny block pool,
greedy and seeded sampling, speculative rounds; full, sparse (window + global) and routed models. Block accounting
after random arrivals, cancellations and timeouts; chunked prefill keeps running requests decoding every step."""
import functools
import logging
import random
import time

import jax
import jax.numpy as jnp
import pytest

from dsjax.model import Transformer
from dsjax.sample import sampler as sampler_lib
from dsjax.sample import speculative
from dsjax.sample import paged_engine
from dsjax.sample.paged_engine import PagedEngine
from tests.model import helpers
from tests.sample.test_engine import MAX_LEN, VOCAB_LIMIT, Reference, prompt_of, shared_model
from tests.sample.test_latent_cache_decoding import tiny_moe_config

BLOCK = 4
SETTINGS = dict(temperature=1.0, top_k=50, top_p=0.9)


@functools.cache
def model_of(kind):
  """(model, params, Reference) for an attention kind; 'full' is tests/sample/test_engine.py's model."""
  if kind == 'full':
    return shared_model()
  cfg = tiny_moe_config() if kind == 'mla' else helpers.tiny_config(kind, vocab_size=384)
  model = Transformer(cfg)
  shapes = helpers.init_shapes(model, jnp.zeros((1, 8), jnp.int32), jnp.arange(8, dtype=jnp.int32)[None])
  params = helpers.random_like(shapes, seed=1, std=0.5)
  return model, params, Reference(model, params, MAX_LEN)


def workload():
  """(prompt, max_new, settings) of a mix: long and short prompts, two sharing a 16-token prefix (4 full blocks)
  with different tails, an exact repeat, a 1-token prompt, one that runs into max_len, and a seeded sampled one."""
  shared = prompt_of(16, offset=9)
  return [(prompt_of(30, 1), 10, {}), (prompt_of(3, 2), 12, {}), (shared + prompt_of(6, 3), 10, {}),
          (shared + prompt_of(9, 4), 10, {}), (prompt_of(30, 1), 10, {}), ([42], 8, {}),
          (prompt_of(MAX_LEN - 5, 5), 10, {}), (prompt_of(12, 2), 10, dict(seed=3, **SETTINGS))]


def expected_of(reference, prompt, max_new, settings):
  return reference(prompt, min(max_new, MAX_LEN - len(prompt)), **settings)


def check_all_free(engine):
  stats = engine.stats()
  assert stats['active'] == 0 and stats['pending'] == 0
  assert stats['kv_blocks_used'] == 0 and stats['kv_blocks_free'] == stats['kv_blocks_total']
  engine._blocks.check()  # pylint: disable=protected-access


@pytest.mark.parametrize('kind', ['full', 'sparse', 'routed',
                                  pytest.param('xl', marks=pytest.mark.slow)])  # test_paged_cache: XL pages exactly
def test_concurrent_requests_equal_each_prompt_alone_with_prefix_hits_and_preemption(kind):
  model, params, reference = model_of(kind)
  # Room for one max_len request (12 blocks) and a little more: concurrent requests must preempt each other.
  engine = PagedEngine(model, params, num_blocks=14, block_size=BLOCK, max_len=MAX_LEN, max_running=6,
                       prefill_budget=8, vocab_limit=VOCAB_LIMIT)
  try:
    assert engine.blocks_per_request() <= 12
    work = workload()
    requests = [engine.submit(p, n, **s) for p, n, s in work]
    for i, ((prompt, max_new, settings), request) in enumerate(zip(work, requests)):
      assert request.result(timeout=300) == expected_of(reference, prompt, max_new, settings), i
    assert requests[6].finish_reason == 'length'
    stats = engine.stats()
    assert stats['prefix_queried_tokens'] >= sum(len(p) for p, _, _ in work)
    if kind == 'full':
      assert stats['preemptions'] > 0
    check_all_free(engine)
  finally:
    engine.shutdown(cancel=True)


@pytest.mark.parametrize('kind', ['full', 'sparse'])
def test_prefix_cache_hits_misses_and_reuse(kind, monkeypatch, caplog):
  """A finished request's blocks stay cached: a prompt sharing its first 16 tokens reuses 4 blocks, its exact
  repeat reuses every full block but the one holding its last token (computed again for its logits), and a prompt
  differing in its first token reuses none; all equal their prompts decoded alone."""
  model, params, reference = model_of(kind)
  monkeypatch.setattr(paged_engine, 'LOG_EVERY_S', 0.0)  # a state line after every step
  caplog.set_level(logging.INFO)
  engine = PagedEngine(model, params, num_blocks=40, block_size=BLOCK, max_len=MAX_LEN, max_running=4,
                       prefill_budget=8, vocab_limit=VOCAB_LIMIT)
  try:
    first = prompt_of(30, 1)
    assert engine.generate(first, 6) == expected_of(reference, first, 6, {})
    assert engine.stats()['prefix_hit_tokens'] == 0
    shares_16 = first[:16] + prompt_of(7, 8)
    differs_first = [first[0] + 1] + first[1:]
    requests = [engine.submit(p, 6) for p in (shares_16, first, differs_first)]
    for prompt, request in zip((shares_16, first, differs_first), requests):
      assert request.result(timeout=300) == expected_of(reference, prompt, 6, {})
    stats = engine.stats()
    assert stats['prefix_hit_tokens'] == 16 + 28  # 4 blocks + (30 - 1) // 4 = 7 blocks
    assert stats['prefix_queried_tokens'] == 30 + 23 + 30 + 30
    check_all_free(engine)
    logged = [r.getMessage() for r in caplog.records if 'prefix cache hit rate' in r.getMessage()]
    assert logged and logged[-1].endswith('hit rate 38.9% (44 of 113 prompt tokens); 0 preemptions'), logged[-1:]
  finally:
    engine.shutdown(cancel=True)


def test_latent_attention_moe_model_pages_its_latent_cache():
  """MLA + DeepSeekMoE (configs/tiny_moe.py shrunk): the pools hold the latent and RoPE key per token; concurrent
  requests with preemption and a prefix repeat equal their prompts decoded alone."""
  model, params, reference = model_of('mla')
  engine = PagedEngine(model, params, num_blocks=13, block_size=BLOCK, max_len=MAX_LEN, max_running=4,
                       prefill_budget=8, vocab_limit=VOCAB_LIMIT)
  try:
    assert engine._pools['k'][0].shape == (1, 14, BLOCK, 8)  # pylint: disable=protected-access  # kv_lora_rank
    prompts = [prompt_of(20, 1), prompt_of(4, 2), prompt_of(20, 1), prompt_of(30, 3)]
    requests = [engine.submit(p, 12) for p in prompts]
    for prompt, request in zip(prompts, requests):
      assert request.result(timeout=300) == expected_of(reference, prompt, 12, {})
    assert engine.stats()['preemptions'] > 0
    check_all_free(engine)
  finally:
    engine.shutdown(cancel=True)


def test_sparse_model_keeps_its_bound_and_long_requests_need_few_blocks():
  """A sparse model (window 3, 2 global tokens) frees out-of-window blocks: a pool far smaller than max_len runs
  long requests side by side without preemption, and each output equals decoding it alone (ring cache)."""
  model, params, reference = model_of('sparse')
  engine = PagedEngine(model, params, num_blocks=12, block_size=BLOCK, max_len=MAX_LEN, max_running=2,
                       prefill_budget=4, vocab_limit=VOCAB_LIMIT)
  try:
    bound = engine.blocks_per_request()
    assert bound < MAX_LEN // BLOCK  # 1 global block + ceil((3 + 4 - 1) / 4) + 1 = 4 of 12
    prompts = [prompt_of(30, 6), prompt_of(25, 7)]
    requests = [engine.submit(p, 14) for p in prompts]
    peak = 0
    while not all(r.done for r in requests):
      peak = max(peak, engine.stats()['kv_blocks_used'])
      time.sleep(0.001)
    for prompt, request in zip(prompts, requests):
      assert request.result() == expected_of(reference, prompt, 14, {})
    assert engine.stats()['preemptions'] == 0 and peak <= 2 * bound
    check_all_free(engine)
  finally:
    engine.shutdown(cancel=True)


@pytest.mark.parametrize('kind, draft', [('full', 'lookup'), ('sparse', 'lookup'), ('full', 'model')])
def test_speculative_rounds_on_the_paged_cache(kind, draft):
  """Drafts (prompt lookup; a draft model whose cache is paged through the same tables) verified on the paged
  cache: greedy requests equal plain greedy decoding alone, a seeded sampled one equals speculative_generate of its
  prompt alone; with preemption (tiny pool) and prefix hits."""
  model, params, reference = model_of(kind)
  if draft == 'lookup':
    drafter = speculative.PromptLookupDrafter()
  else:
    draft_model, draft_params, _ = model_of('routed')  # another model of the same vocabulary
    drafter = speculative.ModelDrafter(sampler_lib.Sampler(draft_model, max_len=MAX_LEN), draft_params)
  engine = PagedEngine(model, params, num_blocks=15, block_size=BLOCK, max_len=MAX_LEN, max_running=4,
                       prefill_budget=8, vocab_limit=VOCAB_LIMIT, drafter=drafter, gamma=3)
  try:
    work = [w for w in workload() if not w[2]]
    repeating = [40, 41, 42, 40, 41, 42, 40, 41, 42, 40]
    work.append((repeating, 10, {}))
    requests = [engine.submit(p, n) for p, n, _ in work]
    sampled_prompt = prompt_of(12, 2)
    sampled = engine.submit(sampled_prompt, 10, seed=3, **SETTINGS)
    if draft == 'model':  # the draft model's cache is paged through the same tables: pools of the pool's size
      assert engine._draft_state['k'][0].shape[1] == 16  # pylint: disable=protected-access
    for i, ((prompt, max_new, _), request) in enumerate(zip(work, requests)):
      assert request.result(timeout=300) == expected_of(reference, prompt, max_new, {}), i
    target = sampler_lib.Sampler(model, max_len=MAX_LEN, extra_slots=4)
    alone, _ = speculative.speculative_generate(target, params, drafter, [sampled_prompt], jax.random.key(3),
                                                max_new_tokens=10, gamma=3, vocab_limit=VOCAB_LIMIT, **SETTINGS)
    assert sampled.result(timeout=300) == alone[0]
    stats = engine.stats()
    assert stats['proposed'] > 0 and (draft == 'model' or stats['accepted'] > 0)  # lookup: the repeating prompt
    if kind == 'full':
      assert stats['preemptions'] > 0
    check_all_free(engine)
  finally:
    engine.shutdown(cancel=True)


def test_requests_sharing_a_prefix_in_flight_compute_it_once():
  """Three requests with the same 33-token prefix arrive together: the first computes it (in chunks of 8), the
  others wait for its blocks instead of computing their own copies, so they hit its 8 full blocks each."""
  model, params, reference = model_of('full')
  engine = PagedEngine(model, params, num_blocks=40, block_size=BLOCK, max_len=MAX_LEN, max_running=4,
                       prefill_budget=8, vocab_limit=VOCAB_LIMIT)
  try:
    prefix = prompt_of(33, 5)
    prompts = [prefix + [7], prefix + [8, 9], prefix + [10]]
    requests = [engine.submit(p, 4) for p in prompts]
    for prompt, request in zip(prompts, requests):
      assert request.result(timeout=300) == expected_of(reference, prompt, 4, {})
    assert engine.stats()['prefix_hit_tokens'] == 2 * 32
    check_all_free(engine)
  finally:
    engine.shutdown(cancel=True)


def test_chunked_prefill_never_stalls_running_requests():
  """While a 40-token prompt prefills in chunks of at most the budget, the running request gets a token every step
  (the engine's step log), and no step feeds more prompt tokens than the budget."""
  model, params, reference = model_of('full')
  engine = PagedEngine(model, params, num_blocks=40, block_size=BLOCK, max_len=MAX_LEN, max_running=4,
                       prefill_budget=8, vocab_limit=VOCAB_LIMIT, record_steps=True)
  try:
    running = engine.submit(prompt_of(3, 1), 40)
    while not running.tokens:
      time.sleep(0.001)
    long_prompt = prompt_of(40, 2)
    long = engine.submit(long_prompt, 4)
    assert long.result(timeout=300) == expected_of(reference, long_prompt, 4, {})
    assert running.result(timeout=300) == expected_of(reference, prompt_of(3, 1), 40, {})
    log = list(engine.step_log)
    chunks = [step for step in log if any(rid == long.id for rid, _ in step['prefill'])]
    assert sum(n for step in chunks for rid, n in step['prefill'] if rid == long.id) == 40
    assert len(chunks) == 5  # 40 tokens / budget 8
    for step in log:
      assert sum(n for _, n in step['prefill']) <= 8
    for step in chunks:
      assert running.id in step['decode'], step
  finally:
    engine.shutdown(cancel=True)


def test_block_accounting_after_random_arrivals_cancellations_and_timeouts():
  """Random arrivals, cancellations and timeouts over a tiny pool (preemptions): every finished greedy request
  equals its prompt alone, and once all are done every block is free (or cached) again."""
  model, params, reference = model_of('full')
  engine = PagedEngine(model, params, num_blocks=13, block_size=BLOCK, max_len=MAX_LEN, max_running=5,
                       prefill_budget=8, vocab_limit=VOCAB_LIMIT, max_queue=64)
  rng = random.Random(0)
  prompts = [prompt_of(n, o) for n, o in [(5, 0), (17, 1), (26, 2), (9, 3), (17, 1)]]
  try:
    requests = []
    for i in range(24):
      prompt = rng.choice(prompts)
      timeout = rng.choice([None, None, None, 0.05])
      requests.append((prompt, engine.submit(prompt, rng.randint(1, 12), timeout=timeout)))
      if rng.random() < 0.25:
        rng.choice(requests)[1].cancel()
      time.sleep(rng.random() * 0.02)
    for prompt, request in requests:
      request.wait(300)
      assert request.done
      alone = reference(prompt, 12)  # greedy: a shorter request's tokens are a prefix of it
      if request.finish_reason == 'length':
        assert request.tokens == alone[:request.max_new_tokens]
      else:
        assert request.finish_reason in ('cancelled', 'timeout')
        assert request.tokens == alone[:len(request.tokens)]
    assert {r.finish_reason for _, r in requests} >= {'length', 'cancelled'}
    deadline = time.monotonic() + 10
    while engine.stats()['active'] and time.monotonic() < deadline:
      time.sleep(0.01)
    check_all_free(engine)
    assert engine.stats()['finished_requests'] == len(requests)
  finally:
    engine.shutdown(cancel=True)


def test_invalid_settings_and_a_pool_too_small_for_one_request():
  model, params, _ = model_of('full')
  with pytest.raises(ValueError, match='num_blocks=5'):
    PagedEngine(model, params, num_blocks=5, block_size=BLOCK, max_len=MAX_LEN)
  with pytest.raises(ValueError, match='block_size'):
    PagedEngine(model, params, num_blocks=50, block_size=0, max_len=MAX_LEN)
