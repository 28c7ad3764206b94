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

import functools
import os
import time
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import sharding as sharding_lib
from dsjax.model import cache as cache_lib
from dsjax.model import layout
from dsjax.sample import sampler as sampler_lib
from dsjax.sample.sampler import Sampler, draw, pad_prompts, probs_for, row_keys
from dsjax import checkpoint
from dsjax.model import Transformer
from dsjax.model.transformer import MultiTokenDrafter

_DRAFT_STREAM, _ACCEPT_STREAM, _DRAW_STREAM = 1, 2, 3
Settings = dict[str, Any]  # temperature / top_k / top_p: [B] arrays; vocab_limit: static int or None


def stream_keys(keys_B: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A row's (draft, accept, draw) keys [B] from its sampling key [B]."""
  fold = jax.vmap(jax.random.fold_in, (0, None))
  return fold(keys_B, _DRAFT_STREAM), fold(keys_B, _ACCEPT_STREAM), fold(keys_B, _DRAW_STREAM)


class Drafter(Protocol):
  """Proposes gamma tokens per row and the distributions they were drawn from, inside jit.

  `params` is the drafter's parameter pytree (passed to the jitted loop as an argument, never baked in as
  constants; None when it has none). The drafter object itself is a static argument of the jitted functions.
  Rows follow the target's invariant: tokens_BL holds each row's committed tokens, lengths_B counts them, and the
  last one (tokens[b, lengths[b] - 1]) is pending: committed but not yet fed to any model.
  """
  params: Any

  def check(self, gamma: int) -> None:
    """Raises ValueError if this drafter cannot propose `gamma` tokens per round."""

  def init(self, params: Any, tokens_BP: jax.Array, lengths_B: jax.Array,
           target_hidden_BPD: jax.Array | None = None) -> Any:
    """State (e.g. a prefilled KV cache) for right-padded prompts [B, P] of lengths [B]; target_hidden_BPD: the
    target's final-normed hidden states at the prompt positions it prefilled (all but the pending token), or None
    (an empty state for rows inserted later)."""

  def observe(self, state: Any, target_hidden_BTD: jax.Array, pos_B: jax.Array, accepted_B: jax.Array,
              active_B: jax.Array) -> Any:
    """State after a verify forward of [pending, drafts] at positions pos_B.. (hidden states [B, gamma + 1, D])
    that accepted accepted_B drafts per row."""

  def insert_row(self, state: Any, row_state: Any, index: jax.Array) -> Any:
    """`state` with its row `index` replaced by a 1-row state from `init` (continuous batching)."""

  def propose(self, params: Any, state: Any, tokens_BL: jax.Array, lengths_B: jax.Array, active_B: jax.Array,
              keys_B: jax.Array, settings: Settings, *, gamma: int, vocab_size: int,
              all_greedy: bool) -> tuple[jax.Array, jax.Array, Any]:
    """(drafts int32 [B, gamma], q float32 [B, gamma, <= vocab_size] with drafts[b, i] ~ q[b, i], new state)."""


def _check_ring(sampler: Sampler, gamma: int, who: str) -> None:
  """A ring cache must have room for tokens that may be taken back without evicting keys still in the window."""
  cfg = sampler.model.cfg
  wraps = cache_lib.cache_length(cfg, sampler.max_len, sampler.extra_slots) < sampler.max_len
  if wraps and sampler.extra_slots < gamma + 1:
    raise ValueError(f'{who}: a ring (sparse) cache needs Sampler(extra_slots >= gamma + 1 = {gamma + 1}), '
                     f'got extra_slots={sampler.extra_slots}')


def prefill_all_but_last(sampler: Sampler, params: Any, tokens_BP: jax.Array, lengths_B: jax.Array):
  """A fresh cache holding every prompt token except the last (the first pending token)."""
  return prefill_with_hidden(sampler, params, tokens_BP, lengths_B)[0]


def prefill_with_hidden(sampler: Sampler, params: Any, tokens_BP: jax.Array,
                        lengths_B: jax.Array) -> tuple[cache_lib.Cache, jax.Array]:
  """(`prefill_all_but_last`'s cache, the target's final-normed hidden states [B, P, D] at the prompt positions)."""
  positions = jnp.broadcast_to(jnp.arange(tokens_BP.shape[1], dtype=jnp.int32), tokens_BP.shape)
  segment_ids = (positions < lengths_B[:, None] - 1).astype(jnp.int32)
  _, cache, hidden = sampler.forward_hidden(params, sampler.init_cache(tokens_BP.shape[0]), tokens_BP, positions,
                                            segment_ids)
  return cache, hidden


def _rows(tokens_BL: jax.Array, index_B: jax.Array) -> jax.Array:
  """tokens_BL[b, index_B[b]] for every row."""
  return jnp.take_along_axis(tokens_BL, index_B[:, None], axis=1)[:, 0]


class ModelDrafter:
  """A small dsjax model sharing the target's tokenizer, with its own KV cache (same invariant as the target's:
  every committed token but the pending one, re-synced at the start of each proposal). q = the distribution of its
  logits with the target's settings. Ring caches need Sampler(extra_slots >= gamma + 1)."""

  def __init__(self, sampler: Sampler, params: Any):
    self.sampler = sampler
    self.params = layout.for_decoding(params)  # once (see dsjax/model/layout.py)

  def check(self, gamma: int) -> None:
    _check_ring(self.sampler, gamma, 'ModelDrafter')

  def init(self, params: Any, tokens_BP: jax.Array, lengths_B: jax.Array,
           target_hidden_BPD: jax.Array | None = None) -> cache_lib.Cache:
    return prefill_all_but_last(self.sampler, params, tokens_BP, lengths_B)

  def observe(self, state, target_hidden_BTD, pos_B, accepted_B, active_B):
    return state  # re-synced from the committed tokens at the next proposal

  def insert_row(self, state: cache_lib.Cache, row_state: cache_lib.Cache, index: jax.Array) -> cache_lib.Cache:
    return cache_lib.insert_row(state, row_state, index)

  def propose(self, params, state, tokens_BL, lengths_B, active_B, keys_B, settings, *, gamma, vocab_size,
              all_greedy):
    """gamma autoregressive draft tokens per row. The cache is first cut back to positions < pos - 1 and then fed
    [prev, pending] at [pos - 1, pos] (pos = lengths - 1): that re-syncs it whatever the last round accepted (the
    last accepted draft or the old pending token is `prev`), with one static shape."""
    sampler = self.sampler
    pos_B = lengths_B - 1
    fits = lambda positions: active_B[:, None] & (positions < sampler.max_len)
    cache = cache_lib.truncate(state, pos_B - 1)
    tokens = jnp.stack([_rows(tokens_BL, jnp.maximum(pos_B - 1, 0)), _rows(tokens_BL, pos_B)], axis=1)
    positions = jnp.stack([jnp.maximum(pos_B - 1, 0), pos_B], axis=1)
    segment_ids = (fits(positions) & jnp.stack([pos_B >= 1, pos_B >= 0], axis=1)).astype(jnp.int32)
    logits, cache = sampler.forward(params, cache, tokens, positions, segment_ids)

    def propose_one(last_BV, i):
      q_BV = probs_for(last_BV, settings, all_greedy)
      if all_greedy:  # q is one-hot: its draw is its argmax
        return jnp.argmax(q_BV, axis=-1).astype(jnp.int32), q_BV
      return draw(q_BV, keys_B, pos_B + 1 + i), q_BV

    def step(carry, i):
      cache, last_BV = carry
      d_B, q_BV = propose_one(last_BV, i)
      position = (pos_B + 1 + i)[:, None]
      logits, cache = sampler.forward(params, cache, d_B[:, None], position, fits(position).astype(jnp.int32))
      return (cache, logits[:, 0]), (d_B, q_BV)

    (cache, last_BV), (d_GB, q_GBV) = jax.lax.scan(step, (cache, logits[:, 1]), jnp.arange(gamma - 1))
    d_B, q_BV = propose_one(last_BV, gamma - 1)  # the last draft needs no forward
    drafts = jnp.concatenate([d_GB, d_B[None]], axis=0).T
    q = jnp.concatenate([q_GBV, q_BV[None]], axis=0).transpose(1, 0, 2)
    if q.shape[-1] > vocab_size:
      raise ValueError(f'the draft model has {q.shape[-1]} logits, more than the target\'s {vocab_size}')
    return drafts, q, cache


class MtpDrafter:
  """Drafts with the target's own multi-token-prediction depth (DeepSeek-V3 section 2.2; `--draft=mtp`): the draft
  after the pending token comes from the target's hidden state at the position before it and the pending token's
  embedding, run through the MTP module with its own one-layer KV cache; later drafts chain the MTP's output state in
  place of the target's (as vLLM/sglang do), so only the first draft of a round sees exact inputs.

  State: the MTP cache (every committed position but the last, re-synced each round), plus the target states of the
  positions it has not yet fed to the MTP (`observe` hands over each verify forward's; `init` the prefill's).
  Params: the target's (its 'embedder', 'mtp_0', 'mtp_0_norm' and 'lm_head' are read)."""

  def __init__(self, model: Transformer, params: Any, *, max_len: int, gamma: int):
    cfg = model.cfg
    if not cfg.mtp.num_layers:
      raise ValueError('--draft=mtp needs a model with multi-token prediction (model.mtp.num_layers > 0); this one '
                       'has none')
    # The MTP cache: the target's positions (max_len), with room for gamma + 1 drafts a ring may take back.
    self.sampler, self.gamma = Sampler(model, max_len=max_len, extra_slots=gamma + 1), int(gamma)
    self.model = MultiTokenDrafter(cfg)
    self.one_layer = cfg.copy_and_resolve_references()
    with self.one_layer.unlocked():
      self.one_layer.num_layers = 1
    # All of the target's params (the module reads its embedder, MTP depth and head): the same arrays as the
    # target's when those are in the decoding layout already (cli.load_model converts once), so no copy.
    self.params = layout.for_decoding(params)

  def check(self, gamma: int) -> None:
    if gamma != self.gamma:
      raise ValueError(f'MtpDrafter was built for gamma={self.gamma}, asked for {gamma}')
    _check_ring(self.sampler, gamma, 'MtpDrafter')

  def _init_cache(self, batch: int) -> cache_lib.Cache:
    return cache_lib.init_cache(self.one_layer, batch, self.sampler.max_len, extra_slots=self.sampler.extra_slots)

  def init(self, params, tokens_BP, lengths_B, target_hidden_BPD=None):
    cfg = self.sampler.model.cfg
    B, P = tokens_BP.shape
    if target_hidden_BPD is None:
      target_hidden_BPD = jnp.zeros((B, P, cfg.hidden_size), jnp.dtype(cfg.dtype))
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    # Position j takes the target's state at j and token j + 1: the prompt's positions before the last state.
    following = jnp.pad(tokens_BP[:, 1:], ((0, 0), (0, 1)))
    segment_ids = (positions < lengths_B[:, None] - 2).astype(jnp.int32)
    _, _, cache = self.model.apply({'params': params}, following, target_hidden_BPD, positions, segment_ids,
                                   self._init_cache(B))
    last = jnp.maximum(lengths_B - 2, 0)
    hidden = jnp.zeros((B, self.gamma + 1, cfg.hidden_size), target_hidden_BPD.dtype)
    hidden = hidden.at[:, 0].set(jnp.take_along_axis(target_hidden_BPD, last[:, None, None], axis=1)[:, 0])
    return dict(cache=cache, hidden=hidden, start=last.astype(jnp.int32),
                count=(lengths_B >= 2).astype(jnp.int32))

  def insert_row(self, state, row_state, index):
    return jax.tree.map(lambda value, new: jax.lax.dynamic_update_slice_in_dim(value, new.astype(value.dtype), index,
                                                                               0), state, row_state)

  def observe(self, state, target_hidden_BTD, pos_B, accepted_B, active_B):
    keep = lambda new, old: jnp.where(active_B.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    return dict(cache=state['cache'], hidden=keep(target_hidden_BTD.astype(state['hidden'].dtype), state['hidden']),
                start=keep(pos_B, state['start']), count=keep(accepted_B + 1, state['count']))

  def propose(self, params, state, tokens_BL, lengths_B, active_B, keys_B, settings, *, gamma, vocab_size,
              all_greedy):
    """Feeds the target states not yet seen (each with the committed token after it), then chains gamma - 1 steps
    on the MTP's own states."""
    apply = lambda *args: self.model.apply({'params': params}, *args)
    max_len = self.sampler.max_len
    pos_B = lengths_B - 1
    fits = lambda positions: active_B[:, None] & (positions < max_len)
    start_B, count_B = state['start'], state['count']
    cache = cache_lib.truncate(state['cache'], start_B)
    positions = start_B[:, None] + jnp.arange(gamma + 1, dtype=jnp.int32)
    following = jnp.take_along_axis(tokens_BL, jnp.minimum(positions + 1, tokens_BL.shape[1] - 1), axis=1)
    segment_ids = (fits(positions) & (jnp.arange(gamma + 1) < count_B[:, None])).astype(jnp.int32)
    logits, h, cache = apply(following, state['hidden'], positions, segment_ids, cache)
    last = jnp.maximum(count_B - 1, 0)[:, None]
    last_BV = jnp.take_along_axis(logits, last[..., None], axis=1)[:, 0]
    h_BD = jnp.take_along_axis(h, last[..., None], axis=1)[:, 0]

    def propose_one(last_BV, i):
      q_BV = probs_for(last_BV, settings, all_greedy)
      if all_greedy:
        return jnp.argmax(q_BV, axis=-1).astype(jnp.int32), q_BV
      return draw(q_BV, keys_B, pos_B + 1 + i), q_BV

    def step(carry, i):
      cache, last_BV, h_BD = carry
      d_B, q_BV = propose_one(last_BV, i)
      position = (pos_B + i)[:, None]  # draft i + 1 (the token at pos + 1 + i) enters at pos + i
      logits, h, cache = apply(d_B[:, None], h_BD[:, None], position, fits(position).astype(jnp.int32), cache)
      return (cache, logits[:, 0], h[:, 0]), (d_B, q_BV)

    (cache, last_BV, _), (d_GB, q_GBV) = jax.lax.scan(step, (cache, last_BV, h_BD), jnp.arange(gamma - 1))
    d_B, q_BV = propose_one(last_BV, gamma - 1)
    drafts = jnp.concatenate([d_GB, d_B[None]], axis=0).T
    q = jnp.concatenate([q_GBV, q_BV[None]], axis=0).transpose(1, 0, 2)
    return drafts, q, dict(state, cache=cache)


def prompt_lookup(tokens_BL: jax.Array, lengths_B: jax.Array, gamma: int, ngram_max: int,
                  ngram_min: int) -> jax.Array:
  """int32 [B, gamma]: for each row's committed tokens tokens[b, :lengths[b]], the gamma tokens that followed the
  latest earlier occurrence of its last n tokens (the longest n in ngram_min..ngram_max that occurs), copied with
  overlap (draft i = tokens[start + i mod (length - start)], so periodic text continues its period); no match: the
  last token repeated. One vectorised pass over every candidate end position (a few ops on [B, L]: cheap next to
  a forward, and few enough that the on-device loop's per-op overhead stays small on CPU)."""
  B, L = tokens_BL.shape
  ends = jnp.arange(L, dtype=jnp.int32)[None]  # candidate n-gram end e; its continuation starts at e + 1
  n_B = lengths_B[:, None]
  # run[b, e]: how many of the last ngram_max tokens match, aligned at their ends (tokens[e - i] == tokens[n-1-i]).
  run = jnp.zeros((B, L), jnp.int32)
  still = jnp.ones((B, L), bool)
  for i in range(ngram_max):
    earlier = jnp.pad(tokens_BL, ((0, 0), (i, 0)), constant_values=-1)[:, :L]  # earlier[b, e] = tokens[b, e - i]
    still &= (earlier == jnp.take_along_axis(tokens_BL, jnp.maximum(n_B - 1 - i, 0), axis=1)) & (n_B - 1 - i >= 0)
    run += still
  usable = (ends <= n_B - 2) & (run >= ngram_min)  # a token follows the occurrence, which is not the suffix itself
  score = jnp.where(usable, run * L + ends, -1)  # longest n first, then the latest occurrence
  best = jnp.argmax(score, axis=1).astype(jnp.int32)
  start = jnp.where(jnp.max(score, axis=1) >= 0, best + 1, lengths_B - 1)
  index = start[:, None] + jnp.arange(gamma, dtype=jnp.int32)[None] % (lengths_B - start)[:, None]
  return jnp.take_along_axis(tokens_BL, index, axis=1).astype(jnp.int32)


class PromptLookupDrafter:
  """n-gram prompt lookup (Saxena 2023): propose what followed the latest earlier occurrence of the context's last
  n tokens (generated text counts; see `prompt_lookup`). q is one-hot, so a draft d is accepted with probability
  p(d) and is greedy-exact at temperature 0. No parameters and no state."""

  params = None

  def __init__(self, ngram_max: int = 3, ngram_min: int = 1):
    if not 1 <= ngram_min <= ngram_max:
      raise ValueError(f'need 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}')
    self.ngram_max = ngram_max
    self.ngram_min = ngram_min

  def check(self, gamma: int) -> None:
    pass

  def init(self, params: Any, tokens_BP: jax.Array, lengths_B: jax.Array,
           target_hidden_BPD: jax.Array | None = None) -> None:
    return None

  def observe(self, state, target_hidden_BTD, pos_B, accepted_B, active_B):
    return state

  def insert_row(self, state: None, row_state: None, index: jax.Array) -> None:
    return None

  def lookup(self, context: np.ndarray, gamma: int) -> list[int]:
    """gamma proposed continuations of one row's committed tokens [n] (host convenience over `prompt_lookup`)."""
    context = jnp.asarray(context, jnp.int32)[None]
    return prompt_lookup(context, jnp.array([context.shape[1]]), gamma, self.ngram_max, self.ngram_min)[0].tolist()

  def propose(self, params, state, tokens_BL, lengths_B, active_B, keys_B, settings, *, gamma, vocab_size,
              all_greedy):
    drafts = prompt_lookup(tokens_BL, lengths_B, gamma, self.ngram_max, self.ngram_min)
    return drafts, jax.nn.one_hot(drafts, vocab_size, dtype=jnp.float32), state


def _verify(sampler: Sampler, params: Any, cache: cache_lib.Cache, pending_B, pos_B, drafts_BG, q_BGV, active_B,
            accept_keys_B, draw_keys_B, settings: Settings, all_greedy: bool):
  """One target forward of [pending, drafts] per row, the accept/reject rule and the extra token.

  Returns (cache truncated to each row's committed tokens but the new pending one, accepted counts int32 [B],
  new pending tokens int32 [B], the target's hidden states [B, G + 1, D]). Inactive rows write nothing and accept 0;
  positions >= max_len are not written.
  """
  B, G = drafts_BG.shape
  tokens = jnp.concatenate([pending_B[:, None], drafts_BG], axis=1)
  positions = pos_B[:, None] + jnp.arange(G + 1, dtype=jnp.int32)
  segment_ids = (active_B[:, None] & (positions < sampler.max_len)).astype(jnp.int32)
  logits, cache, hidden = sampler.forward_hidden(params, cache, tokens, positions, segment_ids)
  if all_greedy:  # p and q are one-hot: d is accepted iff it is the target's argmax, which is also the next token
    targets = jnp.argmax(sampler_lib.masked_logits(logits, settings['vocab_limit']), axis=-1).astype(jnp.int32)
    accepted = drafts_BG == targets[:, :G]
    n_acc = jnp.where(active_B, jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1), 0)
    next_B = jnp.take_along_axis(targets, n_acc[:, None], axis=1)[:, 0]
  else:
    n_acc, next_B = _accept(logits, positions, drafts_BG, q_BGV, active_B, accept_keys_B, draw_keys_B, settings)
  cache = cache_lib.truncate(cache, pos_B + 1 + n_acc)
  return cache, n_acc, next_B, hidden


def _accept(logits_BTV, positions_BT, drafts_BG, q_BGV, active_B, accept_keys_B, draw_keys_B, settings):
  """The rejection rule on the target's logits [B, G + 1, V] at positions [B, G + 1]: (accepted counts [B], the
  token drawn after them [B])."""
  B, G = drafts_BG.shape
  V = logits_BTV.shape[-1]
  per_token = {name: (value if name == 'vocab_limit' else jnp.repeat(value, G + 1))
               for name, value in settings.items()}
  p = sampler_lib.token_probs(logits_BTV.reshape(B * (G + 1), V), **per_token).reshape(B, G + 1, V)
  if q_BGV.shape[-1] < V:  # a draft model with a smaller (unpadded) vocabulary
    q_BGV = jnp.pad(q_BGV, ((0, 0), (0, 0), (0, V - q_BGV.shape[-1])))
  p_d = jnp.take_along_axis(p[:, :G], drafts_BG[..., None], axis=-1)[..., 0]
  q_d = jnp.take_along_axis(q_BGV, drafts_BG[..., None], axis=-1)[..., 0]
  # u ~ U[0, 1) per draft, keyed by the draft's position; accept iff u < p / q (q(d) > 0: d was drawn from q).
  u = jax.vmap(jax.vmap(lambda key, pos: jax.random.uniform(jax.random.fold_in(key, pos)), (None, 0)))(
      accept_keys_B, positions_BT[:, 1:])
  accepted = u * q_d < p_d
  n_acc = jnp.where(active_B, jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1), 0)
  p_next = jnp.take_along_axis(p, n_acc[:, None, None], axis=1)[:, 0]
  q_next = jnp.take_along_axis(jnp.pad(q_BGV, ((0, 0), (0, 1), (0, 0))), n_acc[:, None, None], axis=1)[:, 0]
  residual = jnp.maximum(p_next - q_next, 0.0)  # = p_next after full acceptance (q row of zeros)
  total = jnp.sum(residual, axis=-1, keepdims=True)
  probs = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1.0), p_next)  # rounding guard
  return n_acc, draw(probs, draw_keys_B, positions_BT[:, 0] + 1 + n_acc)


def speculative_round(sampler: Sampler, drafter: Drafter, params: Any, draft_params: Any, cache: cache_lib.Cache,
                      draft_state: Any, tokens_BL: jax.Array, lengths_B: jax.Array, active_B: jax.Array,
                      keys: tuple[jax.Array, jax.Array, jax.Array], settings: Settings, *, gamma: int,
                      all_greedy: bool):
  """One draft + verify round for every active row (traced; the loop below and the engine jit it).

  Returns (cache, draft_state, tokens_BL with each active row's committed tokens written at lengths.., committed
  int32 [B, gamma + 1]: the n_acc accepted drafts then the drawn token, accepted counts n_acc int32 [B]). A row
  commits n_acc + 1 tokens; callers cut that at stop tokens and length limits.
  """
  draft_keys, accept_keys, draw_keys = keys
  drafts, q, draft_state = drafter.propose(draft_params, draft_state, tokens_BL, lengths_B, active_B, draft_keys,
                                           settings, gamma=gamma, vocab_size=sampler.model.cfg.vocab_size,
                                           all_greedy=all_greedy)
  cache, n_acc, next_B, hidden = _verify(sampler, params, cache, _rows(tokens_BL, lengths_B - 1), lengths_B - 1,
                                         drafts, q, active_B, accept_keys, draw_keys, settings, all_greedy)
  draft_state = drafter.observe(draft_state, hidden, lengths_B - 1, n_acc, active_B)
  committed = committed_tokens(drafts, n_acc, next_B)
  index = lengths_B[:, None] + jnp.arange(gamma + 1)
  index = jnp.where(active_B[:, None] & (jnp.arange(gamma + 1) <= n_acc[:, None]), index, tokens_BL.shape[1])
  tokens_BL = tokens_BL.at[jnp.arange(tokens_BL.shape[0])[:, None], index].set(committed, mode='drop')
  return cache, draft_state, tokens_BL, committed, n_acc


def committed_tokens(drafts_BG: jax.Array, n_acc_B: jax.Array, next_B: jax.Array) -> jax.Array:
  """int32 [B, gamma + 1]: the n_acc accepted drafts, then the drawn token (entries after it are don't-cares)."""
  slots = jnp.arange(drafts_BG.shape[1] + 1)[None]
  padded = jnp.pad(drafts_BG, ((0, 0), (0, 1)))
  return jnp.where(slots < n_acc_B[:, None], padded, next_B[:, None])


@functools.partial(jax.jit, static_argnames=('sampler', 'drafter', 'prompt_width', 'gamma', 'vocab_limit',
                                             'all_greedy'))
def _generate_loop(sampler: Sampler, drafter: Drafter, params, draft_params, tokens_BL, lengths_B, max_new_B,
                   keys_B, temperature_B, top_k_B, top_p_B, stop_ids, *, prompt_width, gamma, vocab_limit,
                   all_greedy):
  """The whole speculative generation in one `lax.while_loop` (no host round trip per round).

  tokens_BL: prompts (the longest prompt_width tokens) right-padded to the buffer width L >= prompt + max_new.
  Returns (tokens_BL with the new tokens after each prompt, committed lengths [B], stats [3] = rounds, row rounds,
  accepted drafts)."""
  settings = dict(temperature=temperature_B, top_k=top_k_B, top_p=top_p_B, vocab_limit=vocab_limit)
  keys = stream_keys(keys_B)
  prompts_BP = tokens_BL[:, :prompt_width]
  # Once per call, before the loop (no-ops for params in the decoding layout).
  params, draft_params = layout.for_decoding(params), layout.for_decoding(draft_params)
  cache, hidden = prefill_with_hidden(sampler, params, prompts_BP, lengths_B)
  draft_state = drafter.init(draft_params, prompts_BP, lengths_B, hidden)
  slots = jnp.arange(gamma + 1)[None]

  def cond(carry):
    done_B = carry[4]
    return ~jnp.all(done_B)

  def body(carry):
    cache, draft_state, tokens_BL, n_B, done_B, generated_B, stats = carry
    active_B = ~done_B
    cache, draft_state, tokens_BL, committed, n_acc = speculative_round(
        sampler, drafter, params, draft_params, cache, draft_state, tokens_BL, n_B, active_B, keys, settings,
        gamma=gamma, all_greedy=all_greedy)
    is_stop = jnp.isin(committed, stop_ids) & (slots <= n_acc[:, None])
    stop_at = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1), gamma + 1)
    room = max_new_B - generated_B
    take = jnp.where(active_B, jnp.minimum(jnp.minimum(n_acc + 1, stop_at + 1), room), 0)
    done_B = done_B | (active_B & ((stop_at < take) | (take >= room)))
    stats = stats + jnp.stack([1, jnp.sum(active_B), jnp.sum(n_acc)]).astype(jnp.int32)
    return cache, draft_state, tokens_BL, n_B + take, done_B, generated_B + take, stats

  carry = (cache, draft_state, tokens_BL, lengths_B, max_new_B <= 0, jnp.zeros_like(lengths_B),
           jnp.zeros((3,), jnp.int32))
  _, _, tokens_BL, n_B, _, _, stats = jax.lax.while_loop(cond, body, carry)
  return tokens_BL, n_B, stats


def speculative_generate(target_sampler: Sampler, target_params: Any, drafter: Drafter,
                         prompts: Sequence[Sequence[int]], rng: jax.Array, *, max_new_tokens: int | Sequence[int],
                         gamma: int, temperature: float | Sequence[float] = 0.0, top_k: int | Sequence[int] = 0,
                         top_p: float | Sequence[float] = 1.0, stop_ids: Sequence[int] = (), pad_id: int = 0,
                         vocab_limit: int | None = None) -> tuple[list[list[int]], dict[str, float]]:
  """Like `Sampler.generate` (same arguments and results: new tokens per row, stop token dropped) but drafting
  gamma tokens per target forward, the whole loop on device. Returns (results, stats): acceptance_rate (accepted /
  proposed drafts), tokens_per_target_step (committed tokens per row per verify forward, <= gamma + 1),
  target_steps (verify forwards of the batch), row_steps, proposed, accepted, generated_tokens, seconds."""
  if gamma < 1:
    raise ValueError(f'gamma={gamma}: need at least 1')
  _check_ring(target_sampler, gamma, 'target')
  drafter.check(gamma)
  start_time = time.perf_counter()
  batch = len(prompts)
  per_row = lambda value, dtype: jnp.asarray(np.broadcast_to(np.asarray(value, dtype), (batch,)))
  width = max((len(p) for p in prompts), default=0) + int(np.max(max_new_tokens))
  tokens, lengths, max_new = pad_prompts(prompts, max_new_tokens, target_sampler.max_len, pad_id, width=width)
  temperatures = np.broadcast_to(np.asarray(temperature, np.float32), (batch,))
  stops = sorted(set(int(s) for s in stop_ids))
  with sharding_lib.activate(target_sampler.placement):  # the kernels run per shard on the target's mesh
    out, n, stats = _generate_loop(
        target_sampler, drafter, target_params, drafter.params, jnp.asarray(tokens), jnp.asarray(lengths),
        jnp.asarray(max_new), row_keys(rng, batch), jnp.asarray(temperatures), per_row(top_k, np.int32),
        per_row(top_p, np.float32), jnp.asarray(stops or [-1], jnp.int32), prompt_width=int(lengths.max()),
        gamma=gamma, vocab_limit=vocab_limit, all_greedy=bool(np.all(temperatures <= 0)))
  out, n = np.asarray(out), np.asarray(n)
  target_steps, row_steps, accepted = (int(x) for x in np.asarray(stats))
  results = []
  for b in range(batch):
    new = out[b, lengths[b]:n[b]].tolist()
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    results.append(new[:cut])
  generated = int((n - lengths).sum())
  proposed = gamma * row_steps
  stats = dict(acceptance_rate=accepted / max(proposed, 1), tokens_per_target_step=generated / max(row_steps, 1),
               target_steps=target_steps, row_steps=row_steps, proposed=proposed, accepted=accepted,
               generated_tokens=generated, seconds=time.perf_counter() - start_time)
  return results, stats


def make_drafter(draft: str, target_cfg: Any, *, max_len: int, gamma: int, target_model: Transformer | None = None,
                 target_params: Any = None) -> Drafter | None:
  """The drafter a command line names: '' (none), 'lookup' (PromptLookupDrafter), 'mtp' (MtpDrafter: the target's
  own multi-token-prediction depth; needs target_model and target_params) or a dsjax checkpoint directory of a
  draft model (ModelDrafter; its vocabulary must fit in the target's `target_cfg.vocab_size`)."""
  if not draft:
    return None
  if gamma < 1:
    raise ValueError(f'gamma={gamma}: need at least 1')
  if draft == 'lookup':
    return PromptLookupDrafter()
  if draft == 'mtp':
    if target_model is None or target_params is None:
      raise ValueError("draft='mtp' drafts with the target's own params: pass target_model and target_params")
    return MtpDrafter(target_model, target_params, max_len=max_len, gamma=gamma)
  if not os.path.isdir(draft):
    raise FileNotFoundError(f'draft model checkpoint not found: {draft} (or use "lookup" or "mtp")')
  cfg = checkpoint.load_config(draft)
  if cfg.model.vocab_size > target_cfg.vocab_size:
    raise ValueError(f'draft model {draft}: vocab_size {cfg.model.vocab_size} exceeds the target\'s '
                     f'{target_cfg.vocab_size} (the two must share a tokenizer)')
  params = checkpoint.load_params(draft, cfg.model)
  return ModelDrafter(Sampler(Transformer(cfg.model), max_len=max_len, extra_slots=gamma + 1), params)
