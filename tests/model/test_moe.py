"""DeepSeekMoE (dsjax/model/moe.py): a per-token float64 oracle written from the papers / HF definitions, parity with
transformers' DeepseekV2Moe and DeepseekV3MoE, no dropped token, gradients against a dense implementation, the
auxiliary-loss-free bias update through the optimizer, and the sequence-wise balance loss against its formula."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dsjax.model import moe as moe_lib
from dsjax.train import optimizer as optimizer_lib
from tests.lazy import torch, transformers  # imported on first use (the `hf` extra)
from tests.model.helpers import tiny_config

D, F, E = 32, 16, 8  # hidden size, expert_dim, routed experts


def moe_config(**moe) -> ml_collections.ConfigDict:
  cfg = tiny_config()
  cfg.moe.update(dict(num_experts=E, num_shared_experts=1, expert_dim=F, top_k=3, scoring='softmax',
                      topk_method='greedy', num_groups=1, topk_groups=1, norm_topk_prob=False,
                      routed_scaling_factor=1.0, aux_loss_weight=0.0))
  cfg.moe.update(moe)
  return cfg


def random_params(cfg, seed=0, gate_std=0.5, std=0.3):
  """Unboxed params of MoE(cfg) filled with N(0, std) (the gate kernel N(0, gate_std), so scores are spread), and a
  random correction bias where there is one."""
  shapes = jax.eval_shape(lambda: moe_lib.MoE(cfg).init(jax.random.key(0), jnp.zeros((1, 2, D))))['params']
  shapes = nn.meta.unbox(shapes)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    scale = {'kernel': gate_std if path[0].key == 'gate' else std, moe_lib.BIAS_NAME: 0.1}.get(name, std)
    return jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def apply(cfg, params, x, valid=None):
  return jax.jit(lambda p, x, v: moe_lib.MoE(cfg).apply({'params': p}, x, v))(params, x, valid)


# ---------------------------------------------------------------- float64 per-token oracle


def ranked(values):
  """Indices by decreasing value, the lower index first among equal values."""
  return sorted(range(len(values)), key=lambda i: (-values[i], i))


def oracle_route(scores, mo, bias):
  """One token's (experts, weights) from DeepSeek-V2 (softmax, greedy / group-limited by the best score of a group)
  and DeepSeek-V3 (sigmoid, noaux_tc: bias-corrected choice, groups by the sum of their two best) definitions."""
  e = len(scores)
  choice = scores + bias if mo.topk_method == 'noaux_tc' else scores
  allowed = set(range(e))
  if mo.topk_method != 'greedy':
    size = e // mo.num_groups
    groups = [choice[g * size:(g + 1) * size] for g in range(mo.num_groups)]
    if mo.topk_method == 'group_limited_greedy':
      group_scores = [max(g) for g in groups]
    else:
      group_scores = [sum(sorted(g, reverse=True)[:2]) for g in groups]
    keep = ranked(group_scores)[:mo.topk_groups]
    allowed = {i for i in range(e) if i // size in keep}
  experts = [i for i in ranked(choice) if i in allowed][:mo.top_k]
  weights = np.array([scores[i] for i in experts])
  if mo.norm_topk_prob:
    weights = weights / (weights.sum() + 1e-20)
  return experts, weights * mo.routed_scaling_factor


def np_swiglu(x, gate, up, down):
  g = x @ gate
  return (g / (1.0 + np.exp(-g)) * (x @ up)) @ down


def oracle(cfg, params, x):
  """y [B, T, D] float64 and the experts each token uses, one token at a time."""
  mo = cfg.moe
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  bias = p['gate'].get(moe_lib.BIAS_NAME, np.zeros(E))
  x = np.asarray(x, np.float64)
  y = np.zeros_like(x)
  used = np.zeros(x.shape[:2] + (mo.top_k,), int)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      logits = x[b, t] @ p['gate']['kernel']
      scores = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum() if mo.scoring == 'softmax' \
          else 1.0 / (1.0 + np.exp(-logits))
      experts, weights = oracle_route(scores, mo, bias)
      used[b, t] = experts
      for i, w in zip(experts, weights):
        ex = p['experts']
        y[b, t] += w * np_swiglu(x[b, t], ex['gate_proj'][i], ex['up_proj'][i], ex['down_proj'][i])
      if mo.num_shared_experts:
        sh = p['shared_experts']
        y[b, t] += np_swiglu(x[b, t], sh['gate_proj']['kernel'], sh['up_proj']['kernel'], sh['down_proj']['kernel'])
  return y, used


METHODS = {
    'v2_greedy': dict(scoring='softmax', topk_method='greedy'),
    'v2_group_limited': dict(scoring='softmax', topk_method='group_limited_greedy', num_groups=4, topk_groups=2),
    'v3_noaux_tc': dict(scoring='sigmoid', topk_method='noaux_tc', num_groups=4, topk_groups=2),
}


def assert_close(actual, expected, tol=2e-5):
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol * np.abs(expected).max())


@pytest.mark.parametrize('norm', [False, True])
@pytest.mark.parametrize('method', list(METHODS))
def test_module_matches_the_per_token_oracle(method, norm):
  cfg = moe_config(norm_topk_prob=norm, routed_scaling_factor=2.5, **METHODS[method])
  params = random_params(cfg)
  x = jax.random.normal(jax.random.key(1), (2, 12, D))
  y, aux = apply(cfg, params, x)
  expected, used = oracle(cfg, params, x)
  assert y.shape == (2, 12, D) and y.dtype == jnp.float32
  assert_close(y, expected)
  np.testing.assert_array_equal(aux['expert_load'], np.bincount(used.reshape(-1), minlength=E))
  assert float(aux['balance_loss']) == 0.0  # aux_loss_weight 0: not computed


@pytest.mark.parametrize('method', list(METHODS))
def test_exact_ties_go_to_the_lower_index(method):
  """Experts 4..7 copy the router columns of experts 0..3: every score (and, in groups of 2, every group score) is
  tied exactly, so the selection is decided by the tie rule alone."""
  cfg = moe_config(norm_topk_prob=True, routed_scaling_factor=1.5, **METHODS[method])
  params = random_params(cfg, seed=3)
  kernel = np.array(params['gate']['kernel'])
  kernel[:, 4:] = kernel[:, :4]
  params['gate']['kernel'] = jnp.asarray(kernel)
  if moe_lib.BIAS_NAME in params['gate']:
    params['gate'][moe_lib.BIAS_NAME] = jnp.zeros(E)
  x = jax.random.normal(jax.random.key(2), (1, 16, D))
  scores, _ = moe_lib.Router(E, cfg.moe.scoring).apply({'params': {'kernel': params['gate']['kernel']}},
                                                        x.reshape(-1, D))
  np.testing.assert_array_equal(scores[:, :4], scores[:, 4:])  # the ties are exact in float32 too
  y, _ = apply(cfg, params, x)
  expected, used = oracle(cfg, params, x)
  assert_close(y, expected)
  idx, _ = moe_lib.route(scores, 3, cfg.moe.topk_method, cfg.moe.num_groups, cfg.moe.topk_groups,
                         jnp.zeros(E) if method == 'v3_noaux_tc' else None)
  np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(used.reshape(-1, 3), -1))


def test_tie_rule_on_a_hand_example():
  scores = jnp.array([[0.0, 2.0, 1.0, 2.0, 1.0, 2.0, 0.0, 1.0]])
  np.testing.assert_array_equal(moe_lib.select_experts(scores, 2), [[1, 3]])
  np.testing.assert_array_equal(moe_lib.select_experts(scores, 4), [[1, 3, 5, 2]])
  # Groups (0,1) (2,3) (4,5) (6,7): best scores 2, 2, 2, 1 -> the two lowest of the tied groups.
  np.testing.assert_array_equal(moe_lib.select_experts(scores, 3, 'group_limited_greedy', 4, 2), [[1, 3, 2]])
  # torch.topk promises no order among ties; on CPU it returns [5, 3] here (neither lowest nor highest first), so
  # dsjax fixes the lower index (jax.lax.top_k's documented rule) and the HF parity tests below avoid exact ties.


def test_correction_bias_selects_but_never_weights():
  scores = jnp.array([[0.9, 0.8, 0.1, 0.2]])
  idx, w = moe_lib.route(scores, 2, 'noaux_tc', bias_E=jnp.array([0.0, 0.0, 1.0, 0.0]))
  np.testing.assert_array_equal(idx, [[2, 0]])
  np.testing.assert_allclose(w, [[0.1, 0.9]])


# ---------------------------------------------------------------- transformers parity


def hf_moe(version, cfg, params):
  """transformers' DeepseekV{2,3}MoE built from the same config, with dsjax's weights copied in."""
  mo = cfg.moe
  common = dict(hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=mo.top_k,
                n_shared_experts=mo.num_shared_experts, n_group=mo.num_groups, topk_group=mo.topk_groups,
                routed_scaling_factor=mo.routed_scaling_factor, norm_topk_prob=mo.norm_topk_prob,
                num_attention_heads=4, num_key_value_heads=4, hidden_act='silu')
  if version == 2:
    hf = transformers.models.deepseek_v2.modeling_deepseek_v2
    module = hf.DeepseekV2Moe(transformers.DeepseekV2Config(topk_method=mo.topk_method, **common))
  else:
    hf = transformers.models.deepseek_v3.modeling_deepseek_v3
    module = hf.DeepseekV3MoE(transformers.DeepseekV3Config(**common))
  t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)
  ex, sh = params['experts'], params['shared_experts']
  with torch.no_grad():
    module.gate.weight.copy_(t(params['gate']['kernel']).T)
    if version == 3:
      module.gate.e_score_correction_bias.copy_(t(params['gate'][moe_lib.BIAS_NAME]))
    gate_up = np.concatenate([np.swapaxes(ex['gate_proj'], 1, 2), np.swapaxes(ex['up_proj'], 1, 2)], axis=1)
    module.experts.gate_up_proj.copy_(t(gate_up))  # [E, 2F, D]: gate rows, then up rows
    module.experts.down_proj.copy_(t(np.swapaxes(ex['down_proj'], 1, 2)))  # [E, D, F]
    for name in ('gate_proj', 'up_proj', 'down_proj'):
      getattr(module.shared_experts, name).weight.copy_(t(sh[name]['kernel']).T)
  return module.eval()


@pytest.mark.parametrize('version,moe', [
    (2, dict(scoring='softmax', topk_method='greedy', routed_scaling_factor=1.0, num_shared_experts=2)),
    (2, dict(scoring='softmax', topk_method='group_limited_greedy', num_groups=4, topk_groups=2,
             routed_scaling_factor=16.0, num_shared_experts=2)),
    (3, dict(scoring='sigmoid', topk_method='noaux_tc', num_groups=4, topk_groups=2, norm_topk_prob=True,
             routed_scaling_factor=2.5)),
    (3, dict(scoring='sigmoid', topk_method='noaux_tc', norm_topk_prob=False, routed_scaling_factor=1.0)),
])
def test_parity_with_transformers(version, moe):
  cfg = moe_config(**moe)
  params = random_params(cfg, seed=5)
  x = jax.random.normal(jax.random.key(4), (2, 10, D))
  module = hf_moe(version, cfg, params)
  with torch.no_grad():
    expected = module(torch.tensor(np.asarray(x))).numpy()
  y, _ = apply(cfg, params, x)
  # float32 both sides; atol relative to the output's scale (routed_scaling_factor 16 makes entries of ~30)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# ---------------------------------------------------------------- dropless, padding, load


@pytest.mark.parametrize('method', ['v2_greedy', 'v3_noaux_tc'])
def test_no_token_is_dropped_when_one_expert_gets_every_token(method):
  cfg = moe_config(**METHODS[method])
  params = random_params(cfg, seed=6)
  if moe_lib.BIAS_NAME in params['gate']:
    params['gate'][moe_lib.BIAS_NAME] = jnp.zeros(E)  # sigmoid saturates at 1: a bias could outrank the skew
  kernel = np.array(params['gate']['kernel'])
  # Positive inputs and +1 on the router columns of experts 4 and 5 (one group of 2): logits of ~25 against ~3, so
  # every token picks both (the whole batch on two experts), and a third expert of its own.
  kernel[:, 4:6] += 1.0
  params['gate']['kernel'] = jnp.asarray(kernel)
  x = jnp.abs(jax.random.normal(jax.random.key(7), (4, 16, D)))
  y, aux = apply(cfg, params, x)
  expected, used = oracle(cfg, params, x)
  assert (used == 4).any(-1).all() and (used == 5).any(-1).all()
  np.testing.assert_array_equal(aux['expert_load'][4:6], [64.0, 64.0])
  assert float(aux['expert_load'].sum()) == 64 * 3
  assert_close(y, expected)


def test_padding_is_computed_but_not_counted():
  cfg = moe_config(aux_loss_weight=0.01, **METHODS['v3_noaux_tc'])
  params = random_params(cfg, seed=8)
  x = jax.random.normal(jax.random.key(9), (2, 8, D))
  valid = jnp.arange(8)[None, :] < jnp.array([[8], [3]])
  y, aux = apply(cfg, params, x, valid)
  y_all, aux_all = apply(cfg, params, x)
  np.testing.assert_array_equal(y, y_all)  # each token's output is its own
  _, used = oracle(cfg, params, x)
  np.testing.assert_array_equal(aux['expert_load'], np.bincount(used[np.asarray(valid)].reshape(-1), minlength=E))
  assert float(aux_all['expert_load'].sum()) == 2 * 8 * 3
  # Padding changes nothing in row 0's balance loss: the row-1-only difference shows up
  one_row = apply(cfg, params, x[:1], valid[:1])[1]['balance_loss']
  short_row = apply(cfg, params, x[1:, :3])[1]['balance_loss']
  np.testing.assert_allclose(aux['balance_loss'], (one_row + short_row) / 2, rtol=1e-6)


def test_expert_load_stats():
  stats = moe_lib.expert_load_stats(jnp.array([[4.0, 4.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]]))
  np.testing.assert_allclose(stats['max_over_mean'], [2.0, 1.0])
  np.testing.assert_allclose(stats['min_over_mean'], [0.0, 1.0])
  np.testing.assert_allclose(stats['cv'], [1.0, 0.0])
  np.testing.assert_allclose(stats['unused_fraction'], [0.5, 0.0])


# ---------------------------------------------------------------- gradients


def dense_moe(params, x, cfg):
  """The same layer with every expert computed for every token (einsums), combined by the routed weights."""
  mo = cfg.moe
  x_ND = x.reshape(-1, D)
  logits = jnp.dot(x_ND, params['gate']['kernel'], precision=jax.lax.Precision.HIGHEST)
  scores = moe_lib.expert_scores(logits, mo.scoring)
  idx, w = moe_lib.route(scores, mo.top_k, mo.topk_method, mo.num_groups, mo.topk_groups,
                         params['gate'].get(moe_lib.BIAS_NAME), mo.norm_topk_prob, mo.routed_scaling_factor)
  combine_NE = jnp.zeros((x_ND.shape[0], E)).at[jnp.arange(x_ND.shape[0])[:, None], idx].add(w)
  ex, sh = params['experts'], params['shared_experts']
  h = nn.silu(jnp.einsum('ND,EDF->NEF', x_ND, ex['gate_proj'])) * jnp.einsum('ND,EDF->NEF', x_ND, ex['up_proj'])
  y = jnp.einsum('NEF,EFD,NE->ND', h, ex['down_proj'], combine_NE)
  shared = nn.silu(x_ND @ sh['gate_proj']['kernel']) * (x_ND @ sh['up_proj']['kernel']) @ sh['down_proj']['kernel']
  return (y + shared).reshape(x.shape)


@pytest.mark.parametrize('method', list(METHODS))
def test_gradients_match_a_dense_implementation(method):
  cfg = moe_config(norm_topk_prob=True, routed_scaling_factor=2.0, **METHODS[method])
  params = random_params(cfg, seed=10)
  x = jax.random.normal(jax.random.key(11), (2, 8, D))
  r = jax.random.normal(jax.random.key(12), (2, 8, D))
  loss = lambda p, x: jnp.sum(moe_lib.MoE(cfg).apply({'params': p}, x)[0] * r)
  dense_loss = lambda p, x: jnp.sum(dense_moe(p, x, cfg) * r)
  (gp, gx) = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  (dp, dx) = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))(params, x)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves((gp, gx)))
  np.testing.assert_allclose(loss(params, x), dense_loss(params, x), rtol=1e-5)
  np.testing.assert_allclose(gx, dx, rtol=1e-4, atol=1e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(gp):
    if path[-1].key == moe_lib.BIAS_NAME:
      continue
    want = dict(jax.tree_util.tree_leaves_with_path(dp))[path]
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()), err_msg=str(path))
  assert float(jnp.abs(gp['gate']['kernel']).max()) > 0  # the router learns through the weights
  if method == 'v3_noaux_tc':  # the bias's 'gradient' is the load's deviation from its mean
    load = moe_lib.MoE(cfg).apply({'params': params}, x)[1]['expert_load']
    np.testing.assert_allclose(gp['gate'][moe_lib.BIAS_NAME], load - load.mean(), rtol=1e-6)


def test_gradient_of_one_expert_weight_by_finite_differences():
  cfg = moe_config(norm_topk_prob=True, routed_scaling_factor=2.0, **METHODS['v3_noaux_tc'])
  params = random_params(cfg, seed=13)
  x = jax.random.normal(jax.random.key(14), (1, 8, D))
  expected, used = oracle(cfg, params, x)
  expert = int(used[0, 0, 0])
  grad = jax.grad(lambda p: moe_lib.MoE(cfg).apply({'params': p}, x)[0].sum())(params)
  g = float(grad['experts']['gate_proj'][expert, 3, 5])
  eps = 1e-3
  bumped = lambda s: {**params, 'experts': {
      **params['experts'], 'gate_proj': params['experts']['gate_proj'].at[expert, 3, 5].add(s * eps)}}
  fd = (oracle(cfg, bumped(1), x)[0].sum() - oracle(cfg, bumped(-1), x)[0].sum()) / (2 * eps)
  np.testing.assert_allclose(g, fd, rtol=1e-3)
  assert g != 0.0


# ---------------------------------------------------------------- auxiliary-loss-free balance


def optim_cfg():
  return ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=0, min_lr_ratio=1.0, b1=0.9, b2=0.95,
                                        eps=1e-8, weight_decay=0.1, clip_norm=1.0))


def test_bias_update_moves_the_load_toward_uniform():
  cfg = moe_config(top_k=2, num_shared_experts=0, **METHODS['v3_noaux_tc'])
  params = random_params(cfg, seed=15, gate_std=0.2)
  params['gate'][moe_lib.BIAS_NAME] = jnp.zeros(E)
  kernel = np.array(params['gate']['kernel'])
  kernel[0, :2] += 4.0  # feature 0 is a constant 1: +4 on the logits of experts 0 and 1 for every token
  params['gate']['kernel'] = jnp.asarray(kernel)
  x = jax.random.normal(jax.random.key(16), (4, 32, D)).at[..., 0].set(1.0)
  rate = 0.02
  optimizer = optimizer_lib.make_optimizer(optim_cfg(), 100, bias_update_rate=rate)
  state = optimizer.init(params)

  @jax.jit
  def step(params, state):
    (_, aux), grads = jax.value_and_grad(
        lambda p: (lambda y, aux: (jnp.sum(y ** 2), aux))(*moe_lib.MoE(cfg).apply({'params': p}, x)),
        has_aux=True)(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, aux['expert_load'], updates

  ratios = []
  for i in range(25):
    new_params, state, load, updates = step(params, state)
    ratios.append(float(moe_lib.expert_load_stats(load)['max_over_mean']))
    if i == 0:  # one step: bias_i += rate * sign(mean - load_i), and nothing else of the update reaches the bias
      np.testing.assert_allclose(updates['gate'][moe_lib.BIAS_NAME], rate * np.sign(load.mean() - load), rtol=1e-6)
    # only the bias moves in this test (the rest would follow AdamW)
    params = {**params, 'gate': {**params['gate'], moe_lib.BIAS_NAME: new_params['gate'][moe_lib.BIAS_NAME]}}
  assert ratios[0] > 3.5, ratios  # nearly every token on experts 0 and 1 (E / k = 4 at most)
  assert max(ratios[-5:]) < 1.4, ratios


def test_optimizer_routes_the_bias_around_adamw():
  params = {'gate': {'kernel': jnp.ones((3, 4)), moe_lib.BIAS_NAME: jnp.zeros((2, 4))}}  # a stacked [L, E] bias
  grads = {'gate': {'kernel': jnp.full((3, 4), 1e3), moe_lib.BIAS_NAME: jnp.array([[5.0, -1.0, 0.0, -4.0]] * 2)}}
  for rate, want in ((1e-3, [[-1e-3, 1e-3, 0.0, 1e-3]] * 2), (0.0, np.zeros((2, 4)))):
    opt = optimizer_lib.make_optimizer(optim_cfg(), 10, bias_update_rate=rate)
    updates, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(updates['gate'][moe_lib.BIAS_NAME], want)
    # AdamW saw only the kernel: the huge bias gradient neither clips it nor enters its moments
    plain = optimizer_lib.make_optimizer(optim_cfg(), 10)
    kernel_only = {'gate': {'kernel': params['gate']['kernel']}}
    expected = plain.update({'gate': {'kernel': grads['gate']['kernel']}}, plain.init(kernel_only), kernel_only)[0]
    np.testing.assert_allclose(updates['gate']['kernel'], expected['gate']['kernel'], rtol=1e-6)
  # Without a correction bias the state is the plain clip -> AdamW chain's (dense checkpoints keep their layout).
  assert isinstance(opt.init(params), optax.MultiTransformState)
  assert not isinstance(opt.init({'w': {'kernel': jnp.ones(2)}}), optax.MultiTransformState)


# ---------------------------------------------------------------- balance loss


def test_balance_loss_against_the_formula():
  scores = np.random.default_rng(17).uniform(0.05, 1.0, (2, 3, 4))
  idx = np.array([[[0, 1], [0, 2], [3, 0]], [[1, 2], [2, 3], [0, 1]]])
  valid = np.array([[True, True, True], [True, True, False]])
  e, k = 4, 2
  rows = []
  for b in range(2):
    tokens = [t for t in range(3) if valid[b, t]]
    loss = 0.0
    for i in range(e):
      f = e / (k * len(tokens)) * sum(i in idx[b, t] for t in tokens)
      p = sum(scores[b, t, i] / scores[b, t].sum() for t in tokens) / len(tokens)
      loss += f * p
    rows.append(loss)
  got = moe_lib.balance_loss(jnp.asarray(scores, jnp.float32), jnp.asarray(idx), jnp.asarray(valid))
  np.testing.assert_allclose(got, np.mean(rows), rtol=1e-6)
  # uniform scores and an even spread give 1; a row with no valid token is left out
  uniform = moe_lib.balance_loss(jnp.full((1, 2, 4), 0.3), jnp.array([[[0, 1], [2, 3]]]), jnp.ones((1, 2), bool))
  np.testing.assert_allclose(uniform, 1.0, rtol=1e-6)
  with_empty = moe_lib.balance_loss(jnp.asarray(np.concatenate([scores, scores]), jnp.float32),
                                    jnp.asarray(np.concatenate([idx, idx])),
                                    jnp.asarray(np.concatenate([valid, np.zeros_like(valid)])))
  np.testing.assert_allclose(with_empty, np.mean(rows), rtol=1e-6)


def test_module_balance_loss_and_its_gradient():
  cfg = moe_config(aux_loss_weight=0.001, **METHODS['v3_noaux_tc'])
  params = random_params(cfg, seed=18)
  x = jax.random.normal(jax.random.key(19), (2, 8, D))
  loss_of = lambda p: moe_lib.MoE(cfg).apply({'params': p}, x)[1]['balance_loss']
  loss, grad = jax.value_and_grad(loss_of)(params)
  mo = cfg.moe
  scores = jax.nn.sigmoid(x.reshape(-1, D) @ params['gate']['kernel'])
  idx, _ = moe_lib.route(scores, mo.top_k, mo.topk_method, mo.num_groups, mo.topk_groups,
                         params['gate'][moe_lib.BIAS_NAME])
  np.testing.assert_allclose(loss, moe_lib.balance_loss(scores.reshape(2, 8, E), idx.reshape(2, 8, 3),
                                                        jnp.ones((2, 8), bool)), rtol=1e-5)
  assert 1.0 <= float(loss) <= E / 3
  assert float(jnp.abs(grad['gate']['kernel']).max()) > 0  # through P_i; f_i carries no gradient
  assert float(jnp.abs(grad['experts']['gate_proj']).max()) == 0


# ---------------------------------------------------------------- shapes, dtypes, sharding


def test_param_tree_axes_and_dtypes():
  cfg = moe_config(**METHODS['v3_noaux_tc'])
  cfg.dtype = 'bfloat16'
  variables = moe_lib.MoE(cfg).init(jax.random.key(0), jnp.zeros((1, 4, D), jnp.bfloat16))
  axes = jax.tree_util.tree_map(lambda b: b.names, variables['params'],
                                is_leaf=lambda b: isinstance(b, nn.Partitioned))
  assert axes['gate'] == {'kernel': ('embed', 'experts'), moe_lib.BIAS_NAME: ('experts',)}
  assert axes['experts'] == {'gate_proj': ('experts', 'embed', 'mlp'), 'up_proj': ('experts', 'embed', 'mlp'),
                             'down_proj': ('experts', 'mlp', 'embed')}
  assert axes['shared_experts']['down_proj'] == {'kernel': ('mlp', 'embed')}
  params = nn.meta.unbox(variables['params'])
  assert params['experts']['down_proj'].shape == (E, F, D)
  assert params['shared_experts']['gate_proj']['kernel'].shape == (D, F)
  assert float(jnp.abs(params['gate'][moe_lib.BIAS_NAME]).max()) == 0.0
  x = jax.random.normal(jax.random.key(1), (2, 8, D))
  y16, _ = apply(cfg, params, x.astype(jnp.bfloat16))
  y32, _ = apply(moe_config(**METHODS['v3_noaux_tc']), params, x)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.05 * float(jnp.abs(y32).max()))


def test_deepseek_v3_sized_layer_by_eval_shape():
  cfg = moe_config(num_experts=256, num_shared_experts=1, expert_dim=2048, top_k=8, num_groups=8, topk_groups=4,
                   norm_topk_prob=True, routed_scaling_factor=2.5, aux_loss_weight=1e-4, **{
                       k: v for k, v in METHODS['v3_noaux_tc'].items() if k in ('scoring', 'topk_method')})
  cfg.hidden_size = 7168
  x = jax.ShapeDtypeStruct((2, 64, 7168), jnp.bfloat16)
  shapes = jax.eval_shape(lambda x: moe_lib.MoE(cfg).init_with_output(jax.random.key(0), x), x)
  (y, aux), variables = shapes
  assert y.shape == (2, 64, 7168) and aux['expert_load'].shape == (256,)
  params = nn.meta.unbox(variables['params'])
  assert params['experts']['gate_proj'].shape == (256, 7168, 2048)
  assert sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params)) == \
      7168 * 256 + 256 + 3 * 256 * 7168 * 2048 + 3 * 7168 * 2048


def test_batch_sharded_over_devices_matches_one_device():
  assert jax.device_count() >= 8, 'needs the 8 fake CPU devices of tests/conftest.py'
  cfg = moe_config(aux_loss_weight=0.01, **METHODS['v3_noaux_tc'])
  params = random_params(cfg, seed=20)
  x = jax.random.normal(jax.random.key(21), (8, 4, D))
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
  y, aux = apply(cfg, params, sharded)
  y1, aux1 = apply(cfg, params, x)
  np.testing.assert_allclose(y, y1, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(aux['expert_load'], aux1['expert_load'])
  np.testing.assert_allclose(aux['balance_loss'], aux1['balance_loss'], rtol=1e-6)


def test_scanned_and_rematerialised_layers_give_each_bias_its_own_load():
  """As the Transformer stacks layers (nn.scan over nn.remat): the bias is [L, E] and layer l's 'gradient' is its
  own load's deviation."""
  cfg = moe_config(**METHODS['v3_noaux_tc'])

  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      y, aux = moe_lib.MoE(cfg, name='moe')(x)
      return x + y, aux['expert_load']

  stack = nn.scan(nn.remat(Layer), variable_axes={'params': 0}, split_rngs={'params': True}, length=2,
                  metadata_params={nn.PARTITION_NAME: 'layers'})
  x = jax.random.normal(jax.random.key(22), (2, 8, D))
  params = nn.meta.unbox(stack().init(jax.random.key(0), x, None)['params'])
  loss = lambda p: (lambda y, loads: (jnp.sum(y ** 2), loads))(*stack().apply({'params': p}, x, None))
  grads, loads = jax.jit(jax.grad(loss, has_aux=True))(params)
  bias_grad = grads['moe']['gate'][moe_lib.BIAS_NAME]
  assert bias_grad.shape == (2, E) and loads.shape == (2, E)
  np.testing.assert_allclose(bias_grad, loads - loads.mean(-1, keepdims=True), rtol=1e-6)
