"""Lossless speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a cheap drafter proposes gamma tokens,
the target model scores all of them in one cached forward of gamma + 1 tokens, and a rejection rule keeps exactly
the target's sampling distribution (plain greedy at temperature 0).

Per round and row, with committed context x_1..x_n (x_n the "pending" token: committed, not yet in the target's
cache) and drafts d_1..d_gamma drawn from q_1..q_gamma:
  * the target feeds [x_n, d_1, ..., d_gamma] at positions n-1 .. n-1+gamma and gets p_1 .. p_{gamma+1};
  * d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)), stopping at the first rejection;
  * the row then draws one more token: from norm(max(0, p_i - q_i)) at the first rejection i, or from
    p_{gamma+1} when every draft was accepted;
  * the row's cache forgets the rejected drafts (`cache.truncate`); the drawn token becomes the new pending token.
Rows accept different counts, so every row keeps its own position; one jitted step serves them all. p and the
model drafter's q both come from `sampler.token_probs` with the same settings.

Randomness: per-row keys folded with the position of the token decided (as in `Sampler`), with separate streams
for the drafter, the acceptance uniforms and the corrective draws, so a row's output depends on its prompt,
settings and key only. Each position's uniform and draw decide at most one committed token.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.model import cache as cache_lib
from dsjax.sample.sampler import Sampler, draw, pad_prompts, row_keys, token_probs

_DRAFT_STREAM, _ACCEPT_STREAM, _DRAW_STREAM = 1, 2, 3


@dataclasses.dataclass
class Context:
  """What a drafter sees each round (host arrays unless noted).

  tokens: int32 [B, L] committed tokens (prompt + generated) right-padded; lengths: [B] committed counts, the
  last one (tokens[b, lengths[b] - 1]) being the pending token; active: bool [B] rows still generating;
  keys: [B] drafter keys (device); settings: temperature/top_k/top_p [B] arrays (device) and vocab_limit;
  vocab_size: V of the target's logits.
  """
  tokens: np.ndarray
  lengths: np.ndarray
  active: np.ndarray
  keys: jax.Array
  settings: dict[str, Any]
  vocab_size: int


class Drafter(Protocol):
  """Proposes gamma tokens per row and the distributions they were drawn from."""

  def init(self, tokens_BP: np.ndarray, lengths_B: np.ndarray) -> Any:
    """State for right-padded prompts [B, P] of lengths [B] (e.g. a prefilled KV cache)."""

  def propose(self, state: Any, ctx: Context, gamma: int) -> tuple[jax.Array, jax.Array, Any]:
    """(drafts int32 [B, gamma], q float32 [B, gamma, V] with drafts[b, i] ~ q[b, i], new state)."""


def _prefill_all_but_last(sampler: Sampler, params: Any, tokens_BP: np.ndarray, lengths_B: np.ndarray):
  """A fresh cache holding every prompt token except the last (the first pending token)."""
  batch, width = tokens_BP.shape
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), (batch, width))
  segment_ids = (positions < (lengths_B - 1)[:, None]).astype(np.int32)
  _, cache = sampler.forward(params, sampler.init_cache(batch), jnp.asarray(tokens_BP), jnp.asarray(positions),
                             jnp.asarray(segment_ids))
  return cache


def _check_ring(sampler: Sampler, gamma: int, who: str) -> None:
  """A ring cache must have room for tokens that may be taken back without evicting keys still in the window."""
  cfg = sampler.model.cfg
  wraps = cache_lib.cache_length(cfg, sampler.max_len, sampler.extra_slots) < sampler.max_len
  if wraps and sampler.extra_slots < gamma + 1:
    raise ValueError(f'{who}: a ring (sparse) cache needs Sampler(extra_slots >= gamma + 1 = {gamma + 1}), '
                     f'got extra_slots={sampler.extra_slots}')


@functools.partial(jax.jit, static_argnames=('sampler', 'gamma', 'vocab_limit'))
def _draft_step(sampler: Sampler, params: Any, cache: cache_lib.Cache, prev_B, pending_B, pos_B, active_B, keys_B,
                temperature_B, top_k_B, top_p_B, *, gamma: int, vocab_limit: int | None):
  """gamma autoregressive draft tokens per row. The cache is first cut back to positions < pos - 1 and then fed
  [prev, pending] at [pos - 1, pos]: that re-syncs it whatever the last round accepted (the last accepted draft or
  the old pending token is `prev`), with one static shape."""
  settings = dict(temperature=temperature_B, top_k=top_k_B, top_p=top_p_B, vocab_limit=vocab_limit)
  cache = cache_lib.truncate(cache, pos_B - 1)
  tokens = jnp.stack([prev_B, pending_B], axis=1)
  positions = jnp.stack([jnp.maximum(pos_B - 1, 0), pos_B], axis=1)
  segment_ids = jnp.stack([active_B & (pos_B >= 1), active_B], axis=1).astype(jnp.int32)
  logits, cache = sampler.forward(params, cache, tokens, positions, segment_ids)

  def propose(last_BV, i):
    q_BV = token_probs(last_BV, **settings)
    return draw(q_BV, keys_B, pos_B + 1 + i), q_BV

  def step(carry, i):
    cache, last_BV = carry
    d_B, q_BV = propose(last_BV, i)
    logits, cache = sampler.forward(params, cache, d_B[:, None], (pos_B + 1 + i)[:, None],
                                    active_B[:, None].astype(jnp.int32))
    return (cache, logits[:, 0]), (d_B, q_BV)

  (cache, last_BV), (d_GB, q_GBV) = jax.lax.scan(step, (cache, logits[:, 1]), jnp.arange(gamma - 1))
  d_B, q_BV = propose(last_BV, gamma - 1)  # the last draft needs no forward
  drafts = jnp.concatenate([d_GB, d_B[None]], axis=0).T
  q = jnp.concatenate([q_GBV, q_BV[None]], axis=0).transpose(1, 0, 2)
  return drafts, q, cache


class ModelDrafter:
  """A small dsjax model sharing the target's tokenizer, with its own KV cache (same invariant as the target's:
  every committed token but the pending one, re-synced at the start of each proposal). q = token_probs of its
  logits with the target's settings. Ring caches need Sampler(extra_slots >= gamma + 1)."""

  def __init__(self, sampler: Sampler, params: Any):
    self.sampler = sampler
    self.params = params

  def init(self, tokens_BP: np.ndarray, lengths_B: np.ndarray) -> Any:
    return _prefill_all_but_last(self.sampler, self.params, tokens_BP, lengths_B)

  def propose(self, state: Any, ctx: Context, gamma: int) -> tuple[jax.Array, jax.Array, Any]:
    _check_ring(self.sampler, gamma, 'ModelDrafter')
    rows = np.arange(len(ctx.lengths))
    pending = ctx.tokens[rows, ctx.lengths - 1]
    prev = ctx.tokens[rows, np.maximum(ctx.lengths - 2, 0)]
    s = ctx.settings
    drafts, q, cache = _draft_step(
        self.sampler, self.params, state, jnp.asarray(prev), jnp.asarray(pending),
        jnp.asarray(ctx.lengths - 1, jnp.int32), jnp.asarray(ctx.active), ctx.keys, s['temperature'], s['top_k'],
        s['top_p'], gamma=gamma, vocab_limit=s['vocab_limit'])
    V = q.shape[-1]
    if V < ctx.vocab_size:
      q = jnp.pad(q, ((0, 0), (0, 0), (0, ctx.vocab_size - V)))
    elif V > ctx.vocab_size:
      raise ValueError(f'the draft model has {V} logits, more than the target\'s {ctx.vocab_size}')
    return drafts, q, cache


class PromptLookupDrafter:
  """n-gram prompt lookup (Saxena 2023): find the latest earlier occurrence of the context's last n tokens
  (n = ngram_max .. ngram_min, longest first; generated text counts) and propose the gamma tokens that followed it,
  copying overlapping (periodic text continues its period). No match: repeat the last token. q is one-hot, so a
  draft d is accepted with probability p(d) and is greedy-exact at temperature 0."""

  def __init__(self, ngram_max: int = 3, ngram_min: int = 1):
    if not 1 <= ngram_min <= ngram_max:
      raise ValueError(f'need 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}')
    self.ngram_max = ngram_max
    self.ngram_min = ngram_min

  def init(self, tokens_BP: np.ndarray, lengths_B: np.ndarray) -> Any:
    return None

  def lookup(self, context: np.ndarray, gamma: int) -> list[int]:
    """gamma proposed continuations of one row's committed tokens [n]."""
    n = len(context)
    for k in range(min(self.ngram_max, n - 1), self.ngram_min - 1, -1):
      windows = np.lib.stride_tricks.sliding_window_view(context[:n - 1], k)  # starts j with a token after
      hits = np.flatnonzero(np.all(windows == context[n - k:], axis=1))
      if hits.size:
        start = int(hits[-1]) + k
        out = list(context)
        for i in range(gamma):
          out.append(out[start + i])
        return out[n:]
    return [int(context[-1])] * gamma

  def propose(self, state: Any, ctx: Context, gamma: int) -> tuple[jax.Array, jax.Array, Any]:
    drafts = np.zeros((len(ctx.lengths), gamma), np.int32)
    for b in np.flatnonzero(ctx.active):
      drafts[b] = self.lookup(ctx.tokens[b, :ctx.lengths[b]], gamma)
    drafts = jnp.asarray(drafts)
    return drafts, jax.nn.one_hot(drafts, ctx.vocab_size, dtype=jnp.float32), state


@functools.partial(jax.jit, static_argnames=('sampler', 'vocab_limit'))
def _verify_step(sampler: Sampler, params: Any, cache: cache_lib.Cache, pending_B, pos_B, drafts_BG, q_BGV, active_B,
                 accept_keys_B, draw_keys_B, temperature_B, top_k_B, top_p_B, *, vocab_limit: int | None):
  """One target forward of [pending, drafts] per row, the accept/reject rule and the extra token.

  Returns (cache truncated to each row's committed tokens but the new pending one, accepted counts int32 [B],
  new pending tokens int32 [B]). Inactive rows write nothing and accept 0.
  """
  B, G = drafts_BG.shape
  tokens = jnp.concatenate([pending_B[:, None], drafts_BG], axis=1)
  positions = pos_B[:, None] + jnp.arange(G + 1, dtype=jnp.int32)
  segment_ids = jnp.broadcast_to(active_B[:, None], tokens.shape).astype(jnp.int32)
  logits, cache = sampler.forward(params, cache, tokens, positions, segment_ids)
  V = logits.shape[-1]
  per_token = lambda x: jnp.repeat(x, G + 1)
  p = token_probs(logits.reshape(B * (G + 1), V), temperature=per_token(temperature_B), top_k=per_token(top_k_B),
                  top_p=per_token(top_p_B), vocab_limit=vocab_limit).reshape(B, G + 1, V)
  p_d = jnp.take_along_axis(p[:, :G], drafts_BG[..., None], axis=-1)[..., 0]
  q_d = jnp.take_along_axis(q_BGV, drafts_BG[..., None], axis=-1)[..., 0]
  # u ~ U[0, 1) per draft, keyed by the draft's position; accept iff u < p / q (q(d) > 0: d was drawn from q).
  draft_pos = positions[:, 1:]
  u = jax.vmap(jax.vmap(lambda key, pos: jax.random.uniform(jax.random.fold_in(key, pos)), (None, 0)))(
      accept_keys_B, draft_pos)
  accepted = u * q_d < p_d
  n_acc = jnp.where(active_B, jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1), 0)
  p_next = jnp.take_along_axis(p, n_acc[:, None, None], axis=1)[:, 0]
  q_next = jnp.take_along_axis(jnp.pad(q_BGV, ((0, 0), (0, 1), (0, 0))), n_acc[:, None, None], axis=1)[:, 0]
  residual = jnp.maximum(p_next - q_next, 0.0)  # = p_next after full acceptance (q row of zeros)
  total = jnp.sum(residual, axis=-1, keepdims=True)
  probs = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1.0), p_next)  # rounding guard
  next_B = draw(probs, draw_keys_B, pos_B + 1 + n_acc)
  cache = cache_lib.truncate(cache, pos_B + 1 + n_acc)
  return cache, n_acc, next_B


def speculative_generate(target_sampler: Sampler, target_params: Any, drafter: Drafter,
                         prompts: Sequence[Sequence[int]], rng: jax.Array, *, max_new_tokens: int | Sequence[int],
                         gamma: int, temperature: float | Sequence[float] = 0.0, top_k: int | Sequence[int] = 0,
                         top_p: float | Sequence[float] = 1.0, stop_ids: Sequence[int] = (), pad_id: int = 0,
                         vocab_limit: int | None = None) -> tuple[list[list[int]], dict[str, float]]:
  """Like `Sampler.generate` (same arguments and results: new tokens per row, stop token dropped) but drafting
  gamma tokens per target forward. Returns (results, stats): acceptance_rate (accepted / proposed drafts),
  tokens_per_target_step (committed tokens per row per verify forward, <= gamma + 1), target_steps (verify
  forwards of the batch), row_steps, proposed, accepted, generated_tokens, seconds."""
  if gamma < 1:
    raise ValueError(f'gamma={gamma}: need at least 1')
  _check_ring(target_sampler, gamma, 'target')
  start_time = time.perf_counter()
  batch = len(prompts)
  per_row = lambda value, dtype: np.broadcast_to(np.asarray(value, dtype), (batch,))
  longest = max((len(p) for p in prompts), default=0) + int(np.max(max_new_tokens))  # host buffer of each row
  ctx_tokens, lengths, max_new = pad_prompts(prompts, max_new_tokens, target_sampler.max_len, pad_id, width=longest)
  prompt_tokens = ctx_tokens[:, :int(lengths.max())].copy()
  keys = row_keys(rng, batch)
  draft_keys, accept_keys, draw_keys = (jax.vmap(jax.random.fold_in, (0, None))(keys, s)
                                        for s in (_DRAFT_STREAM, _ACCEPT_STREAM, _DRAW_STREAM))
  settings = dict(temperature=jnp.asarray(per_row(temperature, np.float32)),
                  top_k=jnp.asarray(per_row(top_k, np.int32)), top_p=jnp.asarray(per_row(top_p, np.float32)),
                  vocab_limit=vocab_limit)
  vocab_size = int(target_sampler.model.cfg.vocab_size)
  stops = set(int(s) for s in stop_ids)

  cache = _prefill_all_but_last(target_sampler, target_params, prompt_tokens, lengths)
  draft_state = drafter.init(prompt_tokens, lengths)
  n = lengths.copy()  # committed tokens per row, the last one pending
  generated = np.zeros(batch, np.int32)
  done = max_new <= 0
  rows = np.arange(batch)
  target_steps = row_steps = accepted = 0
  while not done.all():
    active = ~done
    ctx = Context(ctx_tokens, n.copy(), active, draft_keys, settings, vocab_size)
    drafts, q, draft_state = drafter.propose(draft_state, ctx, gamma)
    cache, n_acc, next_B = _verify_step(
        target_sampler, target_params, cache, jnp.asarray(ctx_tokens[rows, n - 1]), jnp.asarray(n - 1),
        drafts, q, jnp.asarray(active), accept_keys, draw_keys, settings['temperature'], settings['top_k'],
        settings['top_p'], vocab_limit=vocab_limit)
    drafts, n_acc, next_B = np.asarray(drafts), np.asarray(n_acc), np.asarray(next_B)
    target_steps += 1
    row_steps += int(active.sum())
    accepted += int(n_acc[active].sum())
    for b in np.flatnonzero(active):
      for token in list(drafts[b, :n_acc[b]]) + [next_B[b]]:
        ctx_tokens[b, n[b]] = token
        n[b] += 1
        generated[b] += 1
        if int(token) in stops or generated[b] >= max_new[b]:
          done[b] = True
          break

  results = []
  for b in range(batch):
    new = ctx_tokens[b, lengths[b]:n[b]].tolist()
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    results.append(new[:cut])
  proposed = gamma * row_steps
  stats = dict(acceptance_rate=accepted / max(proposed, 1),
               tokens_per_target_step=int(generated.sum()) / max(row_steps, 1), target_steps=target_steps,
               row_steps=row_steps, proposed=proposed, accepted=accepted,
               generated_tokens=int(generated.sum()), seconds=time.perf_counter() - start_time)
  return results, stats
