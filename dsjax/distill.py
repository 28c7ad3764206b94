"""Knowledge distillation: a student trained on a frozen teacher's softened distribution plus the hard labels.

Per (micro)batch the training objective becomes (`Distillation`: a term added to the objective of
dsjax/train/objective.py, and a batch preparation that runs the teacher)

  (hard_weight * sum_t nll_t + kl_weight * T^2 * sum_t KL_t) / tokens   [+ z-loss and router terms as without one]

over the non-padding target tokens t (segment_ids > 0), T = distill.temperature, with

  full (distill.top_k = 0):   KL_t = sum_v p_v (log p_v - log q_v),
                              p = softmax(teacher_logits_t / T), log q = log_softmax(student_logits_t / T)
  top-k (distill.top_k = k):  KL_t = sum_{i in K} p^K_i (log p^K_i - log q_i),
                              K = the teacher's k largest logits at t, p^K = softmax(teacher_logits_t[K] / T)
                              (the teacher's top-k distribution, renormalised over K), log q_i the student's
                              full-vocabulary log_softmax(student_logits_t / T) gathered at K (not renormalised).

The top-k KL is >= 0 (sum_K q <= 1), zero iff the student puts exactly p^K on K and nothing elsewhere, and equals
the full KL when k = vocab size. It needs only k (value, id) pairs per token from the teacher, so teacher outputs
can be cached as `TopKLogits` (e.g. [B, T, 64] instead of [B, T, 32k]); in the train step the teacher runs in the
same jitted step (under stop_gradient, with its own param shardings) and only its top-k enters the loss. T^2 keeps
the gradient scale of the soft term independent of T (Hinton et al. 2015).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from dsjax import checkpoint
from dsjax import config as config_lib
from dsjax.model import Transformer
from dsjax.train import objective as objective_lib


class TopKLogits(NamedTuple):
  """The teacher's k largest logits per token: values float32 [B, T, k] and their vocabulary ids int32 [B, T, k]."""
  values: jax.Array
  ids: jax.Array


Teacher = Any  # logits [B, T, V] or TopKLogits


def top_k_logits(logits_BTV: jax.Array, k: int) -> TopKLogits:
  """The k largest logits per token (float32) and their ids."""
  values, ids = jax.lax.top_k(logits_BTV.astype(jnp.float32), k)
  return TopKLogits(values, ids.astype(jnp.int32))


def token_kl(student_logits_BTV: jax.Array, teacher: Teacher, temperature: float) -> jax.Array:
  """KL(teacher_T || student_T) per token, float32 [B, T] (without the T^2 factor); see the module docstring.

  `teacher` is either full logits [B, T, V] or `TopKLogits` (then the top-k definition applies).
  """
  log_q_BTV = jax.nn.log_softmax(student_logits_BTV.astype(jnp.float32) / temperature, axis=-1)
  if isinstance(teacher, TopKLogits):
    log_p_BTK = jax.nn.log_softmax(teacher.values.astype(jnp.float32) / temperature, axis=-1)
    log_q_BTK = jnp.take_along_axis(log_q_BTV, teacher.ids, axis=-1)
    return jnp.sum(jnp.exp(log_p_BTK) * (log_p_BTK - log_q_BTK), axis=-1)
  log_p_BTV = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(log_p_BTV) * (log_p_BTV - log_q_BTV), axis=-1)


def distill_loss_sum(student_logits_BTV: jax.Array, teacher: Teacher, mask_BT: jax.Array,
                     temperature: float) -> jax.Array:
  """T^2 * sum over tokens with mask_BT > 0 of KL(teacher_T || student_T): a float32 scalar."""
  kl_BT = token_kl(student_logits_BTV, teacher, temperature)
  return temperature ** 2 * jnp.sum(jnp.where(mask_BT > 0, kl_BT, 0.0))


def teacher_outputs(teacher_model, teacher_params: Any, batch: dict[str, jax.Array], top_k: int = 0) -> Teacher:
  """The teacher's (deterministic) logits for a batch, float32 [B, T, V], or its `TopKLogits` when top_k > 0;
  gradients stopped (the teacher is frozen)."""
  logits, _ = teacher_model.apply({'params': teacher_params}, batch['inputs'], batch['positions'],
                                  segment_ids=batch['segment_ids'], deterministic=True)
  logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
  return top_k_logits(logits, top_k) if top_k > 0 else logits


TEACHER = 'teacher'  # the batch entry holding the teacher's outputs for its rows


@dataclasses.dataclass(frozen=True)
class Distillation:
  """Distillation as the train step sees it: `prepare(batch, teacher_params)` adds the teacher's (top-k) logits for
  the batch's rows under `batch['teacher']` (run per microbatch, gradients stopped); `extend(objective)` reweights
  the nll by hard_weight and adds the term `distill_kl` (KL summed over tokens, weight kl_weight * T^2)."""
  teacher_model: Any
  temperature: float
  kl_weight: float
  hard_weight: float
  top_k: int

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, teacher_model: Any) -> Distillation:
    d = cfg.distill
    return cls(teacher_model, float(d.temperature), float(d.kl_weight), float(d.hard_weight), int(d.top_k))

  def prepare(self, batch: dict[str, Any], teacher_params: Any) -> dict[str, Any]:
    return {**batch, TEACHER: teacher_outputs(self.teacher_model, teacher_params, batch, self.top_k)}

  def extend(self, objective: objective_lib.Objective) -> objective_lib.Objective:
    def kl_sum(f: objective_lib.Forward) -> jax.Array:
      return (token_kl(f.logits, f.batch[TEACHER], self.temperature) * f.mask).sum()
    term = objective_lib.Term('distill_kl', self.kl_weight * self.temperature ** 2, 'token', kl_sum)
    return objective.with_weight('nll', self.hard_weight).with_term(term)


def load_teacher(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> tuple[Any, Any]:
  """(teacher Transformer, teacher params) from the checkpoint `cfg.distill.teacher`.

  The teacher keeps its own architecture (config.json of the checkpoint); its params are placed on `mesh` with
  the shardings its own logical axes get under this run's `cfg.mesh.rules` (so a teacher of another width is
  sharded on its own terms). Its vocabulary must equal the student's. Raises ConfigError naming
  config.distill.teacher when the directory is missing, is not a checkpoint, or does not fit.
  """
  directory = cfg.distill.teacher
  field = 'config.distill.teacher'
  if not directory or not os.path.isdir(directory):
    raise config_lib.ConfigError(f'{field}={directory!r}: must be a dsjax checkpoint directory (not found)')
  try:
    teacher_cfg = checkpoint.load_config(directory)
  except (FileNotFoundError, ValueError) as e:
    raise config_lib.ConfigError(f'{field}={directory!r}: {e}') from e
  tm = teacher_cfg.model
  if tm.vocab_size != cfg.model.vocab_size:
    raise config_lib.ConfigError(f'{field}={directory!r}: the teacher has vocab_size={tm.vocab_size}, the student '
                                 f'(config.model.vocab_size) {cfg.model.vocab_size}; they must be equal')
  if tm.positions.kind == 'rope' and tm.max_positions < cfg.data.seq_len:
    raise config_lib.ConfigError(f'{field}={directory!r}: the teacher has max_positions={tm.max_positions} < '
                                 f'config.data.seq_len={cfg.data.seq_len}')
  if int(cfg.distill.top_k) > tm.vocab_size:
    raise config_lib.ConfigError(f'config.distill.top_k={cfg.distill.top_k}: more than the vocabulary '
                                 f'({tm.vocab_size})')
  try:
    params = checkpoint.load_params(directory, tm, mesh, cfg.mesh if mesh is not None else None)
  except (FileNotFoundError, ValueError) as e:
    raise config_lib.ConfigError(f'{field}={directory!r}: {e}') from e
  return Transformer(tm), params


def param_shardings(params: Any) -> Any:
  """The shardings of placed (teacher) params, e.g. for a jit's in_shardings."""
  return jax.tree_util.tree_map(lambda x: x.sharding, params)
