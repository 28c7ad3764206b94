"""DP-SGD: per-example gradients and clipping against one-example-at-a-time gradients, the step's update against
the hand-computed clipped mean (with accumulation), the noise scale, and the epsilon accountant."""
import os

from flax import linen as nn
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsjax import config as config_lib
from dsjax import privacy
from dsjax.model import Transformer
from dsjax.train import state as state_lib
from dsjax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ = 16
BATCH = 4
HUGE_TOKEN = 300  # an id outside the byte range: only row 0 feeds it


def tiny_cfg(accum=1, noise_multiplier=0.0, l2_clip=1.0):
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  m = cfg.model
  m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 32, 1, 4, 2, 64
  cfg.data.seq_len = SEQ
  cfg.train.batch_size = BATCH
  cfg.train.grad_accum_steps = accum
  cfg.privacy.enabled = True
  cfg.privacy.l2_clip = l2_clip
  cfg.privacy.noise_multiplier = noise_multiplier
  return cfg


def batch_with_a_huge_example(seed=0):
  """Row 0's inputs are all HUGE_TOKEN, whose embedding is zeroed below: the first RMSNorm then divides by
  sqrt(eps), so row 0's gradient is ~1e3 times the others'. Row 3 ends with padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 259, (BATCH, SEQ + 1))
  tokens[0, :-1] = HUGE_TOKEN
  seg = np.ones((BATCH, SEQ), np.int32)
  seg[3, -5:] = 0
  pos = np.where(seg == 0, 0, np.arange(SEQ)).astype(np.int32)
  return {'inputs': tokens[:, :-1].astype(np.int32), 'targets': tokens[:, 1:].astype(np.int32),
          'segment_ids': seg, 'positions': pos}


@pytest.fixture(scope='module')
def model_and_params():
  cfg = tiny_cfg()
  model = Transformer(cfg.model)
  params = jax.jit(lambda key: nn.meta.unbox(state_lib.init_params(model, key, SEQ)))(jax.random.key(0))
  params['embedder']['embedding'] = params['embedder']['embedding'].at[HUGE_TOKEN].set(0.0)
  return model, params


def example_loss(model, params, example):
  """One example's mean nll over its own non-padding tokens (the DP objective of one row)."""
  one = jax.tree_util.tree_map(lambda x: x[None], example)
  logits, _ = model.apply({'params': params}, one['inputs'], one['positions'], segment_ids=one['segment_ids'])
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(log_probs, one['targets'][..., None], -1)[..., 0]
  mask = (one['segment_ids'] > 0).astype(jnp.float32)
  return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def one_at_a_time(model, params, batch):
  """Per-example gradients without vmap: a Python loop of jax.grad over single rows, flattened [N, P] (float64)."""
  grad = jax.jit(jax.grad(lambda p, ex: example_loss(model, p, ex)))
  rows = []
  for i in range(BATCH):
    g = grad(params, {k: v[i] for k, v in batch.items()})
    rows.append(np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(g)]))
  return np.stack(rows)


@pytest.fixture(scope='module')
def reference(model_and_params):
  """(batch, one-at-a-time per-example grads [N, P], their norms, an l2_clip between the rows' norms)."""
  model, params = model_and_params
  batch = batch_with_a_huge_example()
  want = one_at_a_time(model, params, batch)
  norms = np.linalg.norm(want, axis=1)
  # Halfway between the two smallest norms of rows 1-3: one row unclipped, the rest clipped, and no norm so close
  # to the bound that float32 summation order could move it across.
  low, mid = np.sort(norms[1:])[:2]
  return batch, want, norms, float((low + mid) / 2)


def flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(tree)])


def test_per_example_clipping_bounds_each_contribution(model_and_params, reference):
  model, params = model_and_params
  batch, want, norms, l2_clip = reference
  assert norms[0] > 100 * norms[1:].max(), norms  # row 0 is the huge one
  loss_fn = lambda p, ex: (example_loss(model, p, ex), ())
  grads, _ = jax.jit(lambda p, b: privacy.per_example_grads(loss_fn, p, b))(params, batch)
  got = np.stack([flat(jax.tree_util.tree_map(lambda x, i=i: x[i], grads)) for i in range(BATCH)])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * norms.max())
  # Each example's clipped contribution, alone, has norm <= l2_clip; the sum is the sum of the by-hand clips.
  for i in range(BATCH):
    alone, clipped = privacy.clip_and_sum(jax.tree_util.tree_map(lambda x, i=i: x[i:i + 1], grads), l2_clip)
    assert np.linalg.norm(flat(alone)) <= l2_clip * (1 + 1e-5)
    assert int(clipped) == int(norms[i] > l2_clip)
  total, clipped = privacy.clip_and_sum(grads, l2_clip)
  by_hand = (want * np.minimum(1.0, l2_clip / norms)[:, None]).sum(0)
  np.testing.assert_allclose(flat(total), by_hand, rtol=1e-4, atol=1e-6)
  assert int(clipped) == int((norms > l2_clip).sum())


@pytest.mark.parametrize('accum', [1, 2])
def test_noiseless_update_is_the_mean_of_clipped_per_example_grads(accum, model_and_params, reference):
  model, params = model_and_params
  batch, want, norms, l2_clip = reference
  cfg = tiny_cfg(accum=accum, noise_multiplier=0.0, l2_clip=l2_clip)
  optimizer = optax.sgd(1.0)  # new params = params - grads
  state = state_lib.train_state_from_params(params, optimizer)
  new_state, metrics = jax.jit(step_lib.make_train_step(model, optimizer, cfg))(state, batch, jax.random.key(1))
  update = flat(state.params) - flat(new_state.params)
  by_hand = (want * np.minimum(1.0, l2_clip / norms)[:, None]).mean(0)
  np.testing.assert_allclose(update, by_hand, rtol=2e-4, atol=1e-6 * l2_clip)
  assert np.linalg.norm(update) <= l2_clip * (1 + 1e-5)
  assert float(metrics['clipped_fraction']) == pytest.approx((norms > l2_clip).mean())


def test_noise_std_matches_the_formula(model_and_params, reference):
  """noisy_mean: std noise_multiplier * l2_clip / batch per coordinate, mean 0, over many draws; and the step adds it
  once per step (not once per microbatch)."""
  noise_multiplier, l2_clip, batch_size = 1.3, 0.7, 8
  zeros = {'a': jnp.zeros((1000, 50)), 'b': jnp.zeros((7,))}
  draws = jax.jit(jax.vmap(lambda key: privacy.noisy_mean(zeros, key, l2_clip, noise_multiplier, batch_size)))(
      jax.random.split(jax.random.key(0), 20))
  samples = np.concatenate([np.asarray(x).reshape(20, -1) for x in jax.tree_util.tree_leaves(draws)], axis=1)
  want = noise_multiplier * l2_clip / batch_size
  assert abs(samples.std() / want - 1) < 0.01, (samples.std(), want)
  assert abs(samples.mean()) < 0.01 * want
  assert np.abs(np.corrcoef(samples[0], samples[1])[0, 1]) < 0.01  # fresh noise per key

  model, params = model_and_params
  batch, grads, norms, l2_clip = reference
  optimizer = optax.sgd(1.0)
  state = state_lib.train_state_from_params(params, optimizer)
  cfg = tiny_cfg(accum=2, noise_multiplier=noise_multiplier, l2_clip=l2_clip)
  new_state, _ = jax.jit(step_lib.make_train_step(model, optimizer, cfg))(state, batch, jax.random.key(1))
  noiseless = (grads * np.minimum(1.0, l2_clip / norms)[:, None]).mean(0)  # checked in the test above
  noise = flat(state.params) - flat(new_state.params) - noiseless
  want = noise_multiplier * l2_clip / BATCH
  assert abs(noise.std() / want - 1) < 0.03, (noise.std(), want)


def test_epsilon_follows_noise_and_steps_and_matches_the_accountant():
  q, delta = 0.01, 1e-5
  assert privacy.epsilon(1000, q, 2.0, delta) < privacy.epsilon(1000, q, 1.0, delta)
  assert privacy.epsilon(1000, q, 1.0, delta) < privacy.epsilon(4000, q, 1.0, delta)
  assert privacy.epsilon(1000, q, 1.0, delta) < privacy.epsilon(1000, 2 * q, 1.0, delta)
  assert privacy.epsilon(100, q, 0.0, delta) == float('inf') and privacy.epsilon(0, q, 1.0, delta) == 0.0
  # dp_accounting's RDP accountant, called directly.
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.1)), 2500)
  assert privacy.epsilon(2500, q, 1.1, delta) == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
  # Abadi et al. 2016 (Sec. 3.1): q = 0.01, sigma = 4, T = 10000, delta = 1e-5 gives eps ~ 1.26 with the moments
  # accountant; RDP is a little tighter.
  eps = privacy.epsilon(10000, 0.01, 4.0, 1e-5)
  assert 0.9 < eps <= 1.26, eps


@pytest.mark.parametrize('field,value', [('privacy.l2_clip', 0.0), ('privacy.noise_multiplier', -1.0),
                                         ('privacy.delta', 1.0), ('distill.temperature', 0.0),
                                         ('distill.kl_weight', -0.5), ('distill.top_k', -1)])
def test_config_validation_names_the_field(field, value):
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  section, name = field.split('.')
  cfg[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=field.replace('.', r'\.')):
    config_lib.validate(cfg)
