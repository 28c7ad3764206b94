"""Log-likelihood of continuations under a model: the one scoring pass that multiple choice and the completion
task's target bits per byte share.

A row is (tokens, n): [bos, context..., continuation...] whose last `n` tokens are the continuation. Each row is one
full causal forward pass; rows are right-padded to a multiple of 32 tokens (padding is its own segment 0 and
masked), so the jitted scorer compiles for few widths.
"""
from __future__ import annotations

from typing import Any, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def continuation_log_likelihoods(model: nn.Module, params: Any, rows: Sequence[tuple[Sequence[int], int]], *,
                                 pad_id: int, batch_size: int = 16) -> np.ndarray:
  """The sum of the continuation tokens' log-probabilities (nats) of each row: float64 [len(rows)].

  Every row must have at least 2 tokens, 1 <= n < len(tokens), and len(tokens) - 1 <= model.cfg.max_positions.
  """
  max_len = int(model.cfg.max_positions)
  for i, (tokens, n) in enumerate(rows):
    if not 1 <= n < len(tokens) or len(tokens) - 1 > max_len:
      raise ValueError(f'row {i}: {len(tokens)} tokens with a continuation of {n} (need 1 <= n < tokens and at '
                       f'most max_positions + 1 = {max_len + 1} tokens)')

  @jax.jit
  def score(params, inputs_BT, targets_BT, segment_ids_BT, positions_BT, mask_BT):
    logits_BTV, _ = model.apply({'params': params}, inputs_BT, positions_BT, segment_ids=segment_ids_BT)
    log_p_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    token_log_p_BT = jnp.take_along_axis(log_p_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return jnp.where(mask_BT, token_log_p_BT, 0.0).sum(axis=-1)

  sums = np.zeros((len(rows),), np.float64)
  if not rows:
    return sums
  width = max(len(tokens) - 1 for tokens, _ in rows)
  width = min(-(-width // 32) * 32, max_len)
  B = batch_size
  for begin in range(0, len(rows), B):
    chunk = rows[begin:begin + B]
    inputs, targets = np.full((B, width), pad_id, np.int32), np.full((B, width), pad_id, np.int32)
    segments, mask = np.zeros((B, width), np.int32), np.zeros((B, width), bool)
    for r, (tokens, n_cont) in enumerate(chunk):
      n = len(tokens) - 1
      inputs[r, :n], targets[r, :n], segments[r, :n] = tokens[:-1], tokens[1:], 1
      mask[r, n - n_cont:n] = True
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), (B, width))
    out = np.asarray(score(params, inputs, targets, segments, positions, mask))
    sums[begin:begin + len(chunk)] = out[:len(chunk)]
  return sums
