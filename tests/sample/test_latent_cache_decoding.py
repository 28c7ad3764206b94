"""Decoding a latent-attention + DeepSeekMoE + MTP model (configs/tiny_moe.py shrunk, random params) through its
latent cache: the cache holds [B, S, 1, kv_lora_rank] latents and [B, S, 1, qk_rope_head_dim] RoPE keys; Sampler
greedy output equals argmax decoding with full forwards (no cache) token by token; the continuous-batching engine
gives each of several concurrent prompts its solo output; speculative decoding with the prompt-lookup drafter equals
plain greedy; and with a sparse (window + global) mask the same hold on the bounded ring cache."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax.model import Transformer
from dsjax.model import cache as cache_lib
from dsjax.sample import engine as engine_lib
from dsjax.sample import sampler as sampler_lib
from dsjax.sample import speculative
from tests.model import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_LEN = 32
VOCAB_LIMIT = 259  # the byte tokenizer's ids (the vocabulary is padded to 384)
NEW = 8
GAMMA = 3
# Different lengths; the last repeats itself, so the prompt-lookup drafter finds n-grams to propose.
PROMPTS = [[5, 17, 200, 31, 9], [100], [40, 41, 42, 40, 41, 42, 40, 41, 42, 40, 41]]


def tiny_moe_config(sparse: bool = False):
  """configs/tiny_moe.py's model (MLA with query compression, a dense layer then DeepSeekMoE layers with 8 experts,
  group-limited sigmoid routing with a correction bias, one MTP depth) at test size; `sparse`: window 4 + 2 global
  tokens, which decodes with a ring cache."""
  m = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny_moe.py')).model
  m.update(dict(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=4, mlp_dim=48, max_positions=128))
  m.mla.update(dict(kv_lora_rank=8, q_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5))
  m.moe.expert_dim = 16
  if sparse:
    m.attention.update(dict(kind='sparse', window=4, num_global=2))
  return m


@functools.cache
def model_and_params(sparse: bool = False):
  model = Transformer(tiny_moe_config(sparse))
  shapes = helpers.init_shapes(model, jnp.zeros((1, 8), jnp.int32), jnp.arange(8, dtype=jnp.int32)[None])
  return model, helpers.random_like(shapes, seed=3, std=0.5)


@functools.cache
def uncached_greedy(sparse: bool = False):
  """prompt (tuple) -> NEW tokens of argmax decoding with a full forward (no cache, the training path: scanned
  layers, keys and values expanded per head) over the whole sequence for every new token. One compiled shape: the
  sequence right-padded to MAX_LEN, which causal attention never lets a position see."""
  model, params = model_and_params(sparse)
  forward = helpers.jit(lambda p, t: model.apply({'params': p}, t, jnp.arange(MAX_LEN, dtype=jnp.int32)[None])[0])

  @functools.cache
  def decode(prompt):
    tokens = list(prompt)
    for _ in range(NEW):
      padded = np.zeros((1, MAX_LEN), np.int32)
      padded[0, :len(tokens)] = tokens
      logits = np.asarray(forward(params, jnp.asarray(padded)))[0, len(tokens) - 1, :VOCAB_LIMIT]
      tokens.append(int(np.argmax(logits)))
    return tokens[len(prompt):]
  return decode


def test_cache_holds_the_latent_and_the_rope_key():
  model, params = model_and_params()
  cfg, la = model.cfg, model.cfg.mla
  cache = sampler_lib.Sampler(model, max_len=MAX_LEN).init_cache(2)
  assert len(cache['k']) == len(cache['v']) == cfg.num_layers
  for k, v in zip(cache['k'], cache['v']):
    assert k.shape == (2, MAX_LEN, 1, la.kv_lora_rank) and v.shape == (2, MAX_LEN, 1, la.qk_rope_head_dim)
  # Bytes per token and layer: (kv_lora_rank + qk_rope_head_dim) x itemsize, in the compute dtype.
  for dtype in ('float32', 'bfloat16'):
    layer = jax.eval_shape(lambda: cache_lib.init_cache(cfg, 2, MAX_LEN, dtype=dtype))
    per_token = sum(x.size * x.dtype.itemsize for x in (layer['k'][0], layer['v'][0])) // (2 * MAX_LEN)
    assert per_token == (la.kv_lora_rank + la.qk_rope_head_dim) * jnp.dtype(dtype).itemsize
  # DeepSeek-V3: 576 numbers (1,152 bf16 bytes) per token and layer, against 2 x 128 heads x 128 = 32,768 numbers
  # for its keys and values expanded per head.
  v3 = config_lib.load_config(os.path.join(ROOT, 'configs', 'deepseek_v3.py')).model
  v3_cache = jax.eval_shape(lambda: cache_lib.init_cache(v3, 1, 4))
  assert [x.shape for x in (v3_cache['k'][0], v3_cache['v'][0])] == [(1, 4, 1, 512), (1, 4, 1, 64)]
  assert v3_cache['k'][0].dtype == jnp.bfloat16 and len(v3_cache['k']) == 61

  # A prefill writes each row's prompt tokens (and nothing else) into its slots, the same in every layer.
  sampler = sampler_lib.Sampler(model, max_len=MAX_LEN)
  tokens, lengths, _ = sampler_lib.pad_prompts(PROMPTS[:2], 1, MAX_LEN, 0)
  _, cache = jax.jit(sampler.prefill)(params, sampler.init_cache(2), jnp.asarray(tokens), jnp.asarray(lengths))
  written = np.arange(MAX_LEN)[None] < lengths[:, None]
  np.testing.assert_array_equal(np.asarray(cache['segment_ids']) > 0, written)
  for k, v in zip(cache['k'], cache['v']):
    for array in (np.asarray(k), np.asarray(v)):
      assert np.all(np.abs(array[written]).sum(-1) > 0) and not array[~written].any()


@pytest.mark.parametrize('sparse', [False, True], ids=['full', 'sparse_ring'])
def test_sampler_greedy_equals_uncached_argmax_decoding(sparse):
  """Batched prefill of different-length prompts, then the while_loop of absorbed-form decode steps over the latent
  cache: the same tokens as full forwards without a cache. Sparse: the ring holds num_global + window slots, fewer
  than the tokens decoded, so it wraps."""
  model, params = model_and_params(sparse)
  sampler = sampler_lib.Sampler(model, max_len=MAX_LEN)
  if sparse:
    slots = cache_lib.cache_length(model.cfg, MAX_LEN)
    assert slots == 2 + 4 < len(PROMPTS[2]) + NEW  # a ring, and row 2 wraps it
    assert sampler.init_cache(1)['k'][0].shape == (1, slots, 1, model.cfg.mla.kv_lora_rank)
  got = sampler.generate(params, PROMPTS, jax.random.key(0), max_new_tokens=NEW, vocab_limit=VOCAB_LIMIT)
  reference = uncached_greedy(sparse)
  for prompt, tokens in zip(PROMPTS, got):
    assert tokens == reference(tuple(prompt)), prompt
  assert len({tuple(t) for t in got}) == len(PROMPTS)  # not a degenerate model that says the same for everything


@pytest.mark.parametrize('sparse', [False, True], ids=['full', 'sparse_ring'])
def test_prompt_lookup_speculative_decoding_equals_plain_greedy(sparse):
  """Verify forwards of gamma + 1 tokens over the latent cache, rejected drafts truncated (on the ring: within its
  gamma + 1 extra slots): the plain greedy tokens."""
  model, params = model_and_params(sparse)
  target = sampler_lib.Sampler(model, max_len=MAX_LEN, extra_slots=GAMMA + 1)
  got, stats = speculative.speculative_generate(target, params, speculative.PromptLookupDrafter(), PROMPTS,
                                                jax.random.key(0), max_new_tokens=NEW, gamma=GAMMA,
                                                vocab_limit=VOCAB_LIMIT)
  reference = uncached_greedy(sparse)
  assert got == [reference(tuple(p)) for p in PROMPTS]
  assert stats['proposed'] > 0


@pytest.mark.parametrize('sparse', [False, True], ids=['full', 'sparse_ring'])
def test_engine_gives_concurrent_requests_their_solo_output(sparse):
  """Three requests on two engine slots (the third waits for a free row, then is prefilled into it): each gets the
  tokens of its prompt decoded alone."""
  model, params = model_and_params(sparse)
  engine = engine_lib.Engine(model, params, num_slots=2, max_len=MAX_LEN, max_queue=4, vocab_limit=VOCAB_LIMIT)
  try:
    requests = [engine.submit(p, NEW, stop_ids=[]) for p in PROMPTS]
    results = [r.result(timeout=300) for r in requests]
  finally:
    engine.shutdown(cancel=True)
  reference = uncached_greedy(sparse)
  for prompt, tokens, request in zip(PROMPTS, results, requests):
    assert tokens == reference(tuple(prompt)), prompt
    assert request.finish_reason == 'length'
