"""The training objective: one `loss_fn(params, batch, rng) -> (loss, aux)`, built from named terms; and the
held-out evaluation step (`make_eval_step`).

    loss = sum_token_terms(weight * sum over the batch's tokens) / num_tokens
         + sum_mean_terms(weight * value) / num_pieces

A token term is summed over non-padding tokens (the nll, the z-loss, a distillation KL, multi-token prediction); a
mean term is already a mean over the batch (the router's load-balance loss, an MoE balance loss). New terms join with
`Objective.with_term` (dsjax/distill.py adds its KL this way); nothing else changes.

The loss is additive over row blocks: a gradient strategy that splits a batch (dsjax/train/gradients.py) sets
`batch[NUM_TOKENS]` to the whole batch's token count and `batch[NUM_PIECES]` to the number of blocks, so the summed
gradients of the blocks equal the whole batch's. Without them, a batch is normalised by its own tokens (at least 1)
and counts as one piece (DP-SGD's per-example losses are each an example's own mean).

`aux` = {'sums': {token term: its unweighted sum, 'tokens': count}, 'means': {mean term: value}}.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections

Batch = dict[str, Any]
LossFn = Callable[[Any, Batch, jax.Array | None], tuple[jax.Array, dict[str, Any]]]
NUM_TOKENS = 'loss_num_tokens'  # optional batch entries (see the module docstring); not per-row data
NUM_PIECES = 'loss_num_pieces'
NORMALIZERS = (NUM_TOKENS, NUM_PIECES)


@dataclasses.dataclass(frozen=True)
class Forward:
  """What a term sees of one forward pass: logits [B, T, V] float32 or compute dtype, the model's aux dict
  (router_loss, ...), the batch and its target mask [B, T] float32 (1 = a real target)."""
  logits: jax.Array
  model_aux: dict[str, Any]
  batch: Batch
  mask: jax.Array


@dataclasses.dataclass(frozen=True)
class Term:
  """One term of the objective: `value(forward)` -> a float32 scalar (a token sum or a batch mean, by `kind`)."""
  name: str
  weight: float
  kind: str  # 'token' | 'mean'
  value: Callable[[Forward], jax.Array]


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token negative log-likelihood (nats) and log-partition, both float32 [B, T]."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return log_z_BT - target_logit_BT, log_z_BT


def _nll(f: Forward) -> jax.Array:
  return (token_nll(f.logits, f.batch['targets'])[0] * f.mask).sum()


def _z_loss(f: Forward) -> jax.Array:
  return (jnp.square(token_nll(f.logits, f.batch['targets'])[1]) * f.mask).sum()  # XLA shares the logsumexp


@dataclasses.dataclass(frozen=True)
class Objective:
  """A model and the weighted terms of its loss; `loss_fn` is what gradient strategies differentiate."""
  model: nn.Module
  terms: tuple[Term, ...]

  def with_term(self, term: Term) -> Objective:
    return dataclasses.replace(self, terms=self.terms + (term,))

  def with_weight(self, name: str, weight: float) -> Objective:
    if name not in {t.name for t in self.terms}:
      raise KeyError(f'no term {name!r} in the objective (terms: {[t.name for t in self.terms]})')
    return dataclasses.replace(self, terms=tuple(dataclasses.replace(t, weight=weight) if t.name == name else t
                                                 for t in self.terms))

  def loss_fn(self, params: Any, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, dict[str, Any]]:
    """(loss, aux) of one batch; `rng` None: deterministic (no dropout)."""
    deterministic = rng is None
    logits, model_aux = self.model.apply(
        {'params': params}, batch['inputs'], batch['positions'], segment_ids=batch['segment_ids'],
        deterministic=deterministic, rngs=None if deterministic else {'dropout': rng})
    mask_BT = (batch['segment_ids'] > 0).astype(jnp.float32)
    forward = Forward(logits, model_aux, batch, mask_BT)
    sums = {t.name: t.value(forward) for t in self.terms if t.kind == 'token'}
    means = {t.name: t.value(forward) for t in self.terms if t.kind == 'mean'}
    sums['tokens'] = mask_BT.sum()
    num_tokens = batch.get(NUM_TOKENS, jnp.maximum(sums['tokens'], 1.0))
    num_pieces = batch.get(NUM_PIECES, 1)
    token_part = sum(t.weight * sums[t.name] for t in self.terms if t.kind == 'token')
    loss = token_part / num_tokens
    for t in self.terms:
      if t.kind == 'mean':
        loss = loss + t.weight * means[t.name] / num_pieces
    return loss, {'sums': sums, 'means': means}


def multi_token_nll(f: Forward) -> jax.Array:
  """Summed nll of the multi-token-prediction depths, averaged over depths (DeepSeek-V3 eq. 24-25 without lambda):
  depth k's logits at position i predict token i + k + 1, i.e. `targets` k positions on, counted where that target
  is a real token of the same document as position i."""
  logits_DBTV = f.model_aux['mtp_logits']
  seg_BT = f.batch['segment_ids']
  total = jnp.zeros((), jnp.float32)
  for k in range(1, logits_DBTV.shape[0] + 1):
    nll_BT = token_nll(logits_DBTV[k - 1, :, :-k], f.batch['targets'][:, k:])[0]
    same_document = (seg_BT[:, k:] == seg_BT[:, :-k]) & (seg_BT[:, k:] > 0)
    total += jnp.where(same_document, nll_BT, 0.0).sum()
  return total / logits_DBTV.shape[0]


def _expert_imbalance(f: Forward) -> jax.Array:
  """max / mean tokens per routed expert, averaged over the MoE layers (1 = perfectly balanced); a metric."""
  load_LE = f.model_aux['expert_load']
  return jnp.mean(jnp.max(load_LE, axis=-1) / jnp.maximum(jnp.mean(load_LE, axis=-1), 1e-9))


def language_model(model: nn.Module, cfg: ml_collections.ConfigDict) -> Objective:
  """Next-token nll, plus `train.z_loss_weight` x z-loss (log Z^2); for routed attention, the router's load-balance
  loss at `model.attention.router_aux_weight`; for DeepSeekMoE, the sequence-wise balance loss at
  `model.moe.aux_loss_weight` and the expert load imbalance (max/mean, a metric of weight 0); for multi-token
  prediction, its nll at `model.mtp.loss_weight`. Metrics keep these names (nll is `loss`)."""
  m = cfg.model
  router_weight = m.attention.router_aux_weight if m.attention.kind == 'routed' else 0.0
  terms = [Term('nll', 1.0, 'token', _nll),
           Term('z_loss', float(cfg.train.z_loss_weight), 'token', _z_loss),
           Term('router_loss', float(router_weight), 'mean', lambda f: f.model_aux['router_loss'])]
  if m.moe.num_experts:
    terms += [Term('moe_balance_loss', float(m.moe.aux_loss_weight), 'mean',
                   lambda f: f.model_aux['moe_balance_loss']),
              Term('expert_imbalance', 0.0, 'mean', _expert_imbalance)]
  if m.mtp.num_layers:
    terms.append(Term('mtp_loss', float(m.mtp.loss_weight), 'token', multi_token_nll))
  return Objective(model, tuple(terms))


def make_eval_step(model: nn.Module, token_bytes: jax.Array) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """Returns `eval_step(params, batch) -> sums` of nll (nats), target tokens and the bytes they stand for.

  `token_bytes` [vocab] maps a token id to its length in UTF-8 bytes, so bits per byte compare across tokenizers.
  """
  def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
    logits, _ = model.apply({'params': params}, batch['inputs'], batch['positions'],
                            segment_ids=batch['segment_ids'])
    mask_BT = batch['segment_ids'] > 0
    nll_BT, _ = token_nll(logits, batch['targets'])
    return {'nll_sum': jnp.where(mask_BT, nll_BT, 0.0).sum(), 'tokens': mask_BT.sum(),
            'bytes': jnp.where(mask_BT, token_bytes[batch['targets']], 0).sum()}

  return eval_step
