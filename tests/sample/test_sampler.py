"""The minimal sampler against a naive decode loop (one growing sequence, one full forward per token)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax.model import Transformer
from dsjax.sample import sampler
from tests.model import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_model(kind='full', positions='rope'):
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py')).model
  cfg.unlock()
  cfg.update(dict(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48))
  cfg.attention.kind = kind
  cfg.attention.window = 3
  cfg.attention.num_global = 1
  cfg.attention.top_k = 2
  cfg.positions.kind = positions
  model = Transformer(cfg)
  shapes = helpers.init_shapes(model, jnp.zeros((1, 8), jnp.int32), jnp.arange(8, dtype=jnp.int32)[None])
  params = helpers.random_like(shapes, seed=1, std=0.5)
  return model, params


def naive_greedy(model, params, prompt, steps, vocab_limit):
  """One growing sequence, a full forward pass per new token (compiled per length, cheaply)."""
  forward = helpers.jit(lambda p, x: model.apply({'params': p}, x, jnp.arange(x.shape[1], dtype=jnp.int32)[None]))
  tokens = list(prompt)
  for _ in range(steps):
    logits, _ = forward(params, jnp.asarray([tokens], jnp.int32))
    tokens.append(int(np.argmax(np.asarray(logits[0, -1, :vocab_limit]))))
  return tokens[len(prompt):]


# The buffer trick relies on causality, which tests/model checks for every kind; two kinds suffice here.
@pytest.mark.parametrize('kind, positions', [('sparse', 'rope'), ('routed', 'xl')])
def test_greedy_matches_naive_decoding_for_ragged_prompts(kind, positions):
  model, params = tiny_model(kind, positions)
  prompts = [[1, 2, 3, 4, 5], [7], [9, 8]]
  got = sampler.generate(model, params, prompts, jax.random.key(0), max_new_tokens=5, temperature=0.0,
                         vocab_limit=35)
  assert got == [naive_greedy(model, params, p, 5, 35) for p in prompts]


def test_rows_stop_at_eos_and_drop_it():
  model, params = tiny_model()
  prompt = [3, 1, 4]
  reference = naive_greedy(model, params, prompt, 8, 40)
  eos = reference[2]
  got = sampler.generate(model, params, [prompt], jax.random.key(0), max_new_tokens=8, temperature=0.0,
                         eos_id=eos)
  assert got == [reference[:reference.index(eos)]]


def test_top_k_sampling_only_draws_from_the_k_largest_logits():
  logits = jnp.asarray([[0.0, 3.0, 1.0, 2.5, -1.0]] * 4096)
  draws = np.asarray(sampler.sample_logits(logits, jax.random.key(0), temperature=1.0, top_k=2))
  assert set(np.unique(draws)) == {1, 3}
  # Renormalised over the top 2: p(1) = e^3 / (e^3 + e^2.5).
  np.testing.assert_allclose((draws == 1).mean(), np.exp(3) / (np.exp(3) + np.exp(2.5)), atol=0.03)


def test_vocab_limit_masks_padding_ids():
  logits = jnp.asarray([[0.0, 1.0, 9.0]])
  assert int(sampler.sample_logits(logits, jax.random.key(0), temperature=0.0, vocab_limit=2)[0]) == 1


def test_same_seed_same_samples():
  model, params = tiny_model()
  run = lambda seed: sampler.generate(model, params, [[1, 2]], jax.random.key(seed), max_new_tokens=8,
                                      temperature=1.0)
  assert run(3) == run(3)


def test_sampler_on_tensor_parallel_params_matches_one_device():
  """Params sharded over a (data 2, fsdp 2, tensor 2) mesh by the logical-axis rules: same greedy tokens, and
  top-p sampling with the same per-row keys draws the same tokens."""
  from dsjax import sharding as sharding_lib
  from dsjax import checkpoint
  model, params = tiny_model('sparse')
  mesh_cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py')).mesh
  mesh_cfg.unlock()
  mesh_cfg.update(dict(data=2, fsdp=2, tensor=2))
  shardings = sharding_lib.param_shardings(checkpoint.abstract_params(model.cfg), sharding_lib.make_mesh(mesh_cfg),
                                           mesh_cfg)
  sharded = jax.device_put(params, shardings)
  assert sharded['layers']['attention']['q_proj']['kernel'].sharding.spec[2] == 'tensor'
  run = sampler.Sampler(model, max_len=16)
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
  for settings in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.8, top_k=5)):
    want = run.generate(params, prompts, jax.random.key(7), max_new_tokens=6, **settings)
    got = run.generate(sharded, prompts, jax.random.key(7), max_new_tokens=6, **settings)
    assert got == want, settings


def test_top_p_keeps_the_smallest_nucleus():
  # probs 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps {0, 1} (0.5 < 0.7, 0.8 >= 0.7); renormalised 5/8, 3/8.
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  probs = np.asarray(sampler.token_probs(logits, temperature=1.0, top_p=0.7))
  np.testing.assert_allclose(probs[0], [0.625, 0.375, 0.0, 0.0], atol=1e-6)
  probs = np.asarray(sampler.token_probs(logits, temperature=1.0, top_p=0.5))  # the top token alone reaches 0.5
  np.testing.assert_allclose(probs[0], [1.0, 0.0, 0.0, 0.0], atol=1e-6)
  probs = np.asarray(sampler.token_probs(jnp.concatenate([logits, logits]), temperature=jnp.asarray([0.0, 1.0]),
                                         top_k=jnp.asarray([0, 3])))
  np.testing.assert_allclose(probs[0], [1, 0, 0, 0])  # row 0 greedy
  np.testing.assert_allclose(probs[1], np.array([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=1e-6)  # row 1 top-3
