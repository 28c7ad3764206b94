"""Distillation: the KL term against numpy, a jitted step with a teacher against a pure-jnp gradient, the frozen
teacher, teacher loading (shardings, errors), a distilled student beating a label-only one on KL to the teacher,
and the loop with a teacher checkpoint."""
import copy
import os

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsjax import config as config_lib
from dsjax import distill
from dsjax import sharding as sharding_lib
from dsjax.model import Transformer
from dsjax import checkpoint
from dsjax.train import loop
from dsjax.train import state as state_lib
from dsjax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ = 16
VOCAB = 384


def tiny_cfg(hidden=32, layers=1, accum=1, top_k=0):
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  m = cfg.model
  m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = hidden, layers, 4, 2, 2 * hidden
  cfg.data.seq_len = SEQ
  cfg.train.batch_size = 4
  cfg.train.grad_accum_steps = accum
  cfg.distill.temperature = 2.0
  cfg.distill.kl_weight = 0.7
  cfg.distill.hard_weight = 0.3
  cfg.distill.top_k = top_k
  return cfg


def random_batch(seed=0, batch=4):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 259, (batch, SEQ + 1))
  seg = np.ones((batch, SEQ), np.int32)
  seg[:, :4] = 2
  seg[::2, -3:] = 0  # padding at the end of half the rows
  pos = np.where(seg == 2, np.arange(SEQ), np.arange(SEQ) - 4)
  pos = np.where(seg == 0, 0, pos)
  return {'inputs': tokens[:, :-1].astype(np.int32), 'targets': tokens[:, 1:].astype(np.int32),
          'segment_ids': seg, 'positions': pos.astype(np.int32)}


def init_params(cfg, seed=0):
  model = Transformer(cfg.model)
  return model, jax.jit(lambda key: nn.meta.unbox(state_lib.init_params(model, key, SEQ)))(jax.random.key(seed))


@pytest.fixture(scope='module')
def teacher():
  """A random 2-layer teacher, wider than the students, with peaked (non-uniform) predictions: (cfg, model,
  params)."""
  cfg = tiny_cfg(hidden=48, layers=2)
  cfg.model.init_std = 0.3
  return (cfg, *init_params(cfg, seed=7))


@pytest.fixture(scope='module')
def student():
  """(model, params) of the 1-layer student, initialised once."""
  return init_params(tiny_cfg())


def numpy_kl(student, teacher, temperature, top_k=0):
  """KL(teacher_T || student_T) per token, by hand; top_k: teacher's top-k renormalised vs gathered student."""
  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  log_q = log_softmax(student.astype(np.float64) / temperature)
  t = teacher.astype(np.float64) / temperature
  if top_k:
    ids = np.argsort(-teacher, axis=-1)[..., :top_k]
    log_p = log_softmax(np.take_along_axis(t, ids, -1))
    log_q = np.take_along_axis(log_q, ids, -1)
  else:
    log_p = log_softmax(t)
  return (np.exp(log_p) * (log_p - log_q)).sum(-1)


@pytest.mark.parametrize('top_k', [0, 5])
def test_kl_matches_numpy(top_k):
  rng = np.random.default_rng(0)
  student = rng.normal(size=(2, 6, 11)).astype(np.float32) * 3
  teacher = rng.normal(size=(2, 6, 11)).astype(np.float32) * 3
  mask = (rng.uniform(size=(2, 6)) < 0.7).astype(np.float32)
  temperature = 2.0
  want = numpy_kl(student, teacher, temperature, top_k)
  target = distill.top_k_logits(jnp.asarray(teacher), top_k) if top_k else jnp.asarray(teacher)
  got = np.asarray(distill.token_kl(jnp.asarray(student), target, temperature))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert (got >= -1e-6).all()
  total = float(distill.distill_loss_sum(jnp.asarray(student), target, jnp.asarray(mask), temperature))
  np.testing.assert_allclose(total, temperature ** 2 * (want * mask).sum(), rtol=1e-5)
  # top-k over the whole vocabulary is the full KL.
  full = distill.token_kl(jnp.asarray(student), distill.top_k_logits(jnp.asarray(teacher), 11), temperature)
  np.testing.assert_allclose(np.asarray(full), numpy_kl(student, teacher, temperature), rtol=1e-5, atol=1e-6)


def reference_grads(model, params, teacher_model, teacher_params, batch, cfg):
  """The distillation objective's gradient written out in plain jnp (no dsjax.distill / step code)."""
  T, kw, hw, k = cfg.distill.temperature, cfg.distill.kl_weight, cfg.distill.hard_weight, cfg.distill.top_k

  def loss(p):
    logits, _ = model.apply({'params': p}, batch['inputs'], batch['positions'], segment_ids=batch['segment_ids'])
    t_logits, _ = teacher_model.apply({'params': teacher_params}, batch['inputs'], batch['positions'],
                                      segment_ids=batch['segment_ids'])
    t_logits = jax.lax.stop_gradient(t_logits)
    mask = (batch['segment_ids'] > 0).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(log_probs, batch['targets'][..., None], -1)[..., 0]
    log_q = jax.nn.log_softmax(logits / T, -1)
    if k:
      vals, ids = jax.lax.top_k(t_logits, k)
      log_p = jax.nn.log_softmax(vals / T, -1)
      log_q = jnp.take_along_axis(log_q, ids, -1)
    else:
      log_p = jax.nn.log_softmax(t_logits / T, -1)
    kl = (jnp.exp(log_p) * (log_p - log_q)).sum(-1)
    return (hw * (nll * mask).sum() + kw * T ** 2 * (kl * mask).sum()) / mask.sum()

  return jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize('accum,top_k', [(1, 0), (2, 7)])
def test_step_with_teacher_matches_pure_jnp(accum, top_k, teacher, student):
  cfg = tiny_cfg(accum=accum, top_k=top_k)
  _, teacher_model, teacher_params = teacher
  teacher_before = copy.deepcopy(jax.device_get(teacher_params))
  model, params = student
  optimizer = optax.sgd(1.0)  # new params = params - grads: the update is the gradient
  state = state_lib.train_state_from_params(params, optimizer)
  batch = random_batch()
  step = jax.jit(step_lib.make_train_step(model, optimizer, cfg, teacher=(teacher_model, teacher_params)))
  new_state, metrics = step(state, batch, jax.random.key(1), teacher_params)  # teacher params: an argument
  want = reference_grads(model, state.params, teacher_model, teacher_params, batch, cfg)
  for (path, new), old, g in zip(jax.tree_util.tree_leaves_with_path(new_state.params),
                                 jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(old - new), np.asarray(g), rtol=2e-4, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  assert 'distill_kl' in metrics and float(metrics['distill_kl']) > 0
  # The teacher is frozen: its params are untouched and not part of the trained state.
  for a, b in zip(jax.tree_util.tree_leaves(teacher_params), jax.tree_util.tree_leaves(teacher_before)):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert jax.tree_util.tree_structure(new_state.params) == jax.tree_util.tree_structure(state.params)
  grad_teacher = jax.jit(jax.grad(lambda tp: distill.token_kl(
      jnp.zeros((4, SEQ, VOCAB)), distill.teacher_outputs(teacher_model, tp, batch), 2.0).sum()))(teacher_params)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(grad_teacher))


def test_distilled_student_is_closer_to_the_teacher(teacher, student):
  """Same steps, data and init: distillation (kl 0.5 + hard 0.5) ends with a lower KL to the teacher than labels
  alone."""
  cfg = tiny_cfg()
  cfg.distill.kl_weight, cfg.distill.hard_weight, cfg.distill.temperature = 0.5, 0.5, 1.0
  _, teacher_model, teacher_params = teacher
  model, params = student
  optimizer = optax.adam(1e-2)
  batches = [random_batch(seed) for seed in range(4)]
  held_out = random_batch(99)
  teacher_logits = jax.jit(lambda p: distill.teacher_outputs(teacher_model, p, held_out))(teacher_params)

  @jax.jit
  def held_out_kl(params):
    logits, _ = model.apply({'params': params}, held_out['inputs'], held_out['positions'],
                            segment_ids=held_out['segment_ids'])
    mask = held_out['segment_ids'] > 0
    return jnp.where(mask, distill.token_kl(logits, teacher_logits, 1.0), 0.0).sum() / mask.sum()

  def train(pair):
    state = state_lib.train_state_from_params(params, optimizer)
    step = jax.jit(step_lib.make_train_step(model, optimizer, cfg, teacher=pair))
    for i in range(40):
      args = (pair[1],) if pair else ()
      state, _ = step(state, batches[i % len(batches)], jax.random.key(1), *args)
    return float(held_out_kl(state.params))

  distilled, labels_only = train((teacher_model, teacher_params)), train(None)
  assert distilled < 0.8 * labels_only, (distilled, labels_only)


def test_load_teacher_shards_on_its_own_terms_and_checks_the_vocab(tmp_path, teacher):
  teacher_cfg, _, teacher_params = teacher
  checkpoint.save_model(str(tmp_path / 'teacher'), teacher_cfg, teacher_params)
  cfg = tiny_cfg()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  cfg.distill.teacher = str(tmp_path / 'teacher')
  mesh = sharding_lib.make_mesh(cfg.mesh)
  model, params = distill.load_teacher(cfg, mesh)
  assert model.cfg.hidden_size == 48 and model.cfg.num_layers == 2  # the teacher's own architecture
  P = jax.sharding.PartitionSpec
  assert params['embedder']['embedding'].sharding.spec == P('tensor', 'fsdp')
  assert params['layers']['attention']['q_proj']['kernel'].sharding.spec == P(None, 'fsdp', 'tensor', None)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(teacher_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cfg.model.vocab_size = 512
  with pytest.raises(config_lib.ConfigError, match='config.distill.teacher'):
    distill.load_teacher(cfg, mesh)
  cfg.distill.teacher = str(tmp_path / 'missing')
  with pytest.raises(config_lib.ConfigError, match='config.distill.teacher'):
    distill.load_teacher(cfg, mesh)


@pytest.mark.slow  # heavy end-to-end run: kept out of the 10-minute default suite (pytest -m slow runs it)
def test_loop_trains_with_a_teacher_and_dp(tmp_path, teacher):
  """train() with distill.teacher (and DP-SGD on): logs distill_kl and clipped_fraction, reports epsilon."""
  teacher_cfg, _, teacher_params = teacher
  checkpoint.save_model(str(tmp_path / 'teacher'), teacher_cfg, teacher_params)
  cfg = tiny_cfg()
  cfg.distill.teacher = str(tmp_path / 'teacher')
  cfg.distill.top_k = 8
  cfg.privacy.enabled = True
  cfg.data.seq_len = 128
  cfg.data.eval_batches = 1
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2  # student and teacher sharded, each by its own axes
  cfg.train.batch_size = 16  # 2 microbatches of 8 rows
  cfg.train.grad_accum_steps = 2
  cfg.train.steps = 3
  cfg.train.log_every = 1
  cfg.train.num_samples = 0
  cfg.train.progress_bar = False
  summary = loop.train(cfg)
  record = summary['history'][-1]
  assert record['distill_kl'] > 0 and 0 <= record['clipped_fraction'] <= 1
  report = summary['privacy']
  assert report['steps'] == 3 and report['delta'] == cfg.privacy.delta and 0 < report['sampling_rate'] < 1
  assert 0 < report['epsilon'] < float('inf')
