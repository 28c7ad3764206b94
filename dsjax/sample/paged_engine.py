"""Continuous batching over a paged KV cache: one pool of fixed-size blocks shared by every request.

  engine = PagedEngine(model, params, num_blocks=512, block_size=16, max_len=4096, vocab_limit=tokenizer.vocab_size)
  request = engine.submit(prompt_ids, max_new_tokens=64)     # the same Request API as engine.Engine
  ...
  engine.shutdown()

Where engine.Engine gives each of `num_slots` rows a max_len cache, here a request holds only the blocks of the
tokens it has (dsjax/model/pages.py pools, a block table per request; dsjax/sample/blocks.py hands them out), so
how many run at once is bounded by blocks, not by max_len rows. Each engine step (one iteration of the thread):
  * admission: queued requests start while a row (`max_running`) and blocks for their prompt are free; a request
    first takes the longest cached prefix of its prompt (full blocks keyed by a hash chain of their tokens, shared by
    reference; unreferenced ones are evicted least recently used first) and computes only the rest;
  * work: every decoding request feeds its pending token (one batched call over them, rows bucketed to powers of
    two) and prefilling requests feed chunks of their prompts up to `prefill_budget` tokens in all (one call per
    chunk), so a long prompt delays running requests by at most one chunk per step (chunked prefill). The call that
    feeds a request's last prompt token draws its first new token;
  * memory: blocks are allocated as requests grow; when none is left the newest running request is preempted (its
    blocks freed, requeued at the front, recomputed later from its prompt and the tokens it has so far: its output
    does not change), never failed. Sparse models free the blocks that left every future query's window (past
    the global tokens), so they keep their bound per request.
Full blocks are keyed as soon as they are written, generated tokens included, so a preempted request usually finds
its own blocks still cached. A request's tokens use its own key folded with each position, as Sampler.generate does
for one prompt, so they do not depend on what else runs (greedy: equal to decoding it alone).

With a `drafter` (speculative.ModelDrafter or PromptLookupDrafter) each step is one speculative round for every
decoding request (speculative.speculative_round on the paged cache); requests then keep a row of `max_running` for
the committed-token buffer the drafters read. A draft model pages its KV cache too: its own pools, addressed by the
same block tables (a block holds the same tokens for both models), fed with every prompt chunk, so prefix hits and
preemption cover it. The multi-token-prediction drafter needs the target's hidden states of the whole prompt, which
prefix caching and chunked prefill do not keep: use engine.Engine for it.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from typing import Any, Callable

from absl import logging
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsjax import sharding as sharding_lib
from dsjax.model import cache as cache_lib
from dsjax.model import layout
from dsjax.model.attention import mask_args, uses_ring
from dsjax.model.pages import NULL_PAGE
from dsjax.sample import blocks as blocks_lib
from dsjax.sample import sampler as sampler_lib
from dsjax.sample import speculative
from dsjax.sample.engine import Engine, Request, bucket

LOG_EVERY_S = 60.0  # the engine logs its cache state and prefix-cache hit rate this often while it works


@dataclasses.dataclass(eq=False)
class _Sequence:
  """A running request's host state: its tokens (prompt + new ones; the last is pending, not yet in the cache,
  once it decodes), how many are in the cache, and the blocks holding them."""
  request: Request
  row: int
  order: int  # admission order: the newest running request is preempted first
  tokens: list[int]
  key_data: np.ndarray
  computed: int = 0  # tokens 0 .. computed - 1 are in the cache
  blocks: list[int] = dataclasses.field(default_factory=list)  # logical block -> page (NULL_PAGE: not held)
  keys: list[bytes] = dataclasses.field(default_factory=list)  # content keys of its first len(keys) full blocks
  prompt_keys: list[bytes] = dataclasses.field(default_factory=list)  # keys of its prompt's full blocks
  draft_ready: bool = False  # speculative: the drafter's row holds this request


class PagedEngine(Engine):
  """Continuous batching over `num_blocks` KV blocks of `block_size` tokens (see the module docstring).

  `max_len`: tokens per request (prompt + new). `max_running`: requests decoding at once at most (a static bound
  for the per-row arrays; memory is bounded by blocks). `prefill_budget`: prompt tokens fed per step at most.
  `max_queue`, `vocab_limit`, `drafter`, `gamma`, `placement`, `on_fatal`: as engine.Engine. `record_steps`: keep a
  log of what each step fed (`step_log`: dicts step / decode (request ids) / prefill ((request id, tokens))).
  """

  def __init__(self, model: nn.Module, params: Any, *, num_blocks: int, block_size: int = 16, max_len: int,
               max_running: int = 64, prefill_budget: int = 512, max_queue: int = 64, vocab_limit: int | None = None,
               drafter: speculative.Drafter | None = None, gamma: int = 4,
               placement: sharding_lib.Placement | None = None,
               on_fatal: Callable[[BaseException], None] | None = None, record_steps: bool = False):
    if block_size < 1 or max_running < 1 or prefill_budget < 1 or max_len < 2 or max_queue < 0:
      raise ValueError(f'need block_size, max_running, prefill_budget >= 1, max_len >= 2, max_queue >= 0; got '
                       f'{block_size}, {max_running}, {prefill_budget}, {max_len}, {max_queue}')
    if drafter is not None and gamma < 1:
      raise ValueError(f'gamma={gamma}: need at least 1')
    if isinstance(drafter, speculative.MtpDrafter):
      raise ValueError('the paged engine cannot run the multi-token-prediction drafter: it starts from the target\'s '
                       'hidden states of the whole prompt, which prefix caching and chunked prefill do not keep; '
                       'use the fixed-slot engine (engine.Engine, serve.py --engine=slots)')
    cfg = model.cfg
    self.params = layout.for_decoding(params)
    self.num_slots, self.max_len, self.max_queue = int(max_running), int(max_len), int(max_queue)
    self.block_size, self.num_blocks = int(block_size), int(num_blocks)
    self.prefill_budget = int(prefill_budget)
    self.vocab_limit, self.vocab_size = vocab_limit, int(cfg.vocab_size)
    self.on_fatal = on_fatal
    self.drafter, self.gamma = drafter, int(gamma)
    if drafter is not None:
      drafter.check(self.gamma)
    self.sampler = sampler_lib.Sampler(model, max_len=max_len, placement=placement)
    self.table_width = math.ceil(self.max_len / self.block_size)  # M: blocks of the longest request
    # A draft model pages its cache through the same block tables (its own pools, the same tokens per position).
    self.draft_paged = isinstance(drafter, speculative.ModelDrafter)
    models = [cfg] + ([drafter.sampler.model.cfg] if self.draft_paged else [])
    # Sparse (ring) models: blocks wholly before every future query's window, past the global tokens, are freed
    # (with a draft model, before both models' windows).
    self.window = max((mask_args(c.attention)[0] for c in models), default=None) if all(map(uses_ring, models)) \
        else None
    self.num_global = max(mask_args(c.attention)[1] for c in models)
    need = self.blocks_per_request()
    if self.num_blocks < need:
      raise ValueError(f'num_blocks={num_blocks}: one request of max_len={max_len} tokens needs {need} blocks of '
                       f'{block_size} tokens at once; give the cache at least that many blocks')
    self.record_steps = record_steps
    self.step_log: collections.deque[dict[str, Any]] = collections.deque(maxlen=100_000)
    self.preemptions = 0
    self._logged_at = time.monotonic()
    self.prefix_queried_tokens = self.prefix_hit_tokens = 0

    jit = lambda fn, **kw: sharding_lib.placed(jax.jit(fn, **kw), placement)
    self._feed = jit(self._feed_and_draw, donate_argnums=(1,), static_argnames=('all_greedy',))
    if self.draft_paged:
      self._feed_draft = jit(self._feed_draft_model, donate_argnums=(1,))
    if drafter is not None:
      self._round = jit(self._paged_round, donate_argnums=(2, 3, 4), static_argnames=('all_greedy',))
      self._draft_init = jit(self._init_draft_row, donate_argnums=(1, 2))
      if not self.draft_paged:
        self._init_draft_state = jit(drafter.init)
    self._slots: list[Request | None] = [None] * self.num_slots
    self._init_device_state()
    self._start()

  def blocks_per_request(self) -> int:
    """The most blocks one request holds at once: all of max_len for a full cache; for a sparse model the global
    tokens' blocks plus those spanning the window and one step's tokens."""
    full = self.table_width
    if self.window is None:
      return full
    step = max(self.prefill_budget, self.gamma + 1 if self.drafter is not None else 1)
    bound = math.ceil(self.num_global / self.block_size) + math.ceil((self.window + step - 1) / self.block_size) + 1
    return min(full, bound)

  def _init_device_state(self) -> None:
    """Fresh page pools (and drafter state), an empty block pool and no running sequences."""
    n = self.num_slots
    self._pools = cache_lib.init_pages(self.sampler.model.cfg, self.num_blocks + 1, self.block_size)
    self._blocks = blocks_lib.BlockPool(self.num_blocks, self.block_size)
    self._seqs: dict[int, _Sequence] = {}  # by row
    self._order = 0
    self._pos = np.zeros(n, np.int32)  # engine.Engine._deliver's position count, per row
    if self.draft_paged:  # the draft model's page pools: its rows' cache is addressed by the same tables
      self._draft_state = cache_lib.init_pages(self.drafter.sampler.model.cfg, self.num_blocks + 1, self.block_size)
    elif self.drafter is not None:
      empty = jnp.zeros((n, 1), jnp.int32)
      self._draft_state = self._init_draft_state(self.drafter.params, empty, jnp.ones((n,), jnp.int32))
    if self.drafter is not None:
      self._tokens = jnp.zeros((n, self.max_len), jnp.int32)  # each row's committed tokens, for the drafter

  def _device_state(self) -> list[Any]:
    state = [self._pools] + ([] if self.drafter is None else [self._draft_state, self._tokens])
    return jax.tree.leaves(state)

  def stats(self) -> dict[str, int]:
    stats = super().stats()
    with self._lock:
      blocks = self._blocks
      stats.update(kv_blocks_total=blocks.num_blocks, kv_blocks_used=blocks.num_used,
                   kv_blocks_free=blocks.num_free, kv_blocks_cached=blocks.num_cached,
                   prefix_queried_tokens=self.prefix_queried_tokens, prefix_hit_tokens=self.prefix_hit_tokens,
                   preemptions=self.preemptions)
    return stats

  # ---- jitted device functions ----

  def _feed_and_draw(self, params, pools, tokens_RC, start_R, count_R, table_RM, keys_R, temperature_R, top_k_R,
                     top_p_R, *, all_greedy):
    """Rows feed count_R tokens [R, C] (right-padded) at positions start_R.. into their blocks; each row draws the
    token after its last fed one (key folded with that position). Returns (tokens [R], pools)."""
    C = tokens_RC.shape[1]
    positions = start_R[:, None] + jnp.arange(C, dtype=jnp.int32)
    segment_ids = (jnp.arange(C)[None] < count_R[:, None]).astype(jnp.int32)
    cache = cache_lib.paged_cache(pools, table_RM, start_R)
    logits, cache = self.sampler.forward(params, cache, tokens_RC, positions, segment_ids)
    last = jnp.take_along_axis(logits, jnp.maximum(count_R - 1, 0)[:, None, None], axis=1)[:, 0]
    settings = dict(temperature=temperature_R, top_k=top_k_R, top_p=top_p_R, vocab_limit=self.vocab_limit)
    drawn = sampler_lib.next_tokens(last, settings, jax.random.wrap_key_data(keys_R), start_R + count_R, all_greedy)
    return drawn, dict(k=cache['k'], v=cache['v'])

  def _feed_draft_model(self, draft_params, draft_pools, tokens_RC, start_R, count_R, table_RM):
    """The same tokens into the draft model's pools (its keys and values for the positions the target fed)."""
    C = tokens_RC.shape[1]
    positions = start_R[:, None] + jnp.arange(C, dtype=jnp.int32)
    segment_ids = (jnp.arange(C)[None] < count_R[:, None]).astype(jnp.int32)
    cache = cache_lib.paged_cache(draft_pools, table_RM, start_R)
    _, cache = self.drafter.sampler.forward(draft_params, cache, tokens_RC, positions, segment_ids)
    return dict(k=cache['k'], v=cache['v'])

  def _init_draft_row(self, draft_params, draft_state, tokens_NL, row, tokens_1P, length):
    """The drafter's state and the token buffer for row `row` from its committed tokens [1, P] (`length` real); a
    paged draft model's cache is already in its pools (fed with the prompt chunks)."""
    tokens_NL = jax.lax.dynamic_update_slice(tokens_NL, tokens_1P[:, :self.max_len], (row, jnp.int32(0)))
    if self.draft_paged:
      return draft_state, tokens_NL
    draft_row = self.drafter.init(draft_params, tokens_1P, length[None])
    return self.drafter.insert_row(draft_state, draft_row, row), tokens_NL

  def _paged_round(self, params, draft_params, pools, draft_state, tokens_NL, n_N, table_NM, keys_N, temperature_N,
                   top_k_N, top_p_N, active_N, *, all_greedy):
    """One speculative round for every row on the paged cache (rows hold n_N committed tokens, all but the last in
    the cache). Returns (pools, draft_state, tokens_NL, committed [N, gamma + 1], accepted [N])."""
    settings = dict(temperature=temperature_N, top_k=top_k_N, top_p=top_p_N, vocab_limit=self.vocab_limit)
    keys = speculative.stream_keys(jax.random.wrap_key_data(keys_N))
    n_N = jnp.maximum(n_N, 1)
    cache = cache_lib.paged_cache(pools, table_NM, n_N - 1)
    if self.draft_paged:  # ModelDrafter.propose re-syncs from position n - 2: its cache up to there is in the pools
      draft_state = cache_lib.paged_cache(draft_state, table_NM, n_N - 1)
    cache, draft_state, tokens_NL, committed, accepted = speculative.speculative_round(
        self.sampler, self.drafter, params, draft_params, cache, draft_state, tokens_NL, n_N, active_N, keys,
        settings, gamma=self.gamma, all_greedy=all_greedy)
    if self.draft_paged:
      draft_state = dict(k=draft_state['k'], v=draft_state['v'])
    return dict(k=cache['k'], v=cache['v']), draft_state, tokens_NL, committed, accepted

  # ---- engine thread ----

  def _run(self) -> None:
    try:
      while (expired := self._wait_for_work()) is not None:
        self._expire(expired)
        self._drop_cancelled()
        self._admit_pending()
        if self._has_active():
          self._step_all()
    except BaseException as e:  # pylint: disable=broad-except
      self._thread_failed(e)
    self._wind_down()

  def _pop_expired(self) -> list[Request]:
    expired = super()._pop_expired()
    for row, seq in list(self._seqs.items()):  # running requests whose rows _pop_expired emptied
      if self._slots[row] is not seq.request:
        self._release(seq)
    return expired

  def _drop_cancelled(self) -> None:
    for row, seq in list(self._seqs.items()):
      if seq.request._cancelled:
        self._free(row, 'cancelled')

  def _release(self, seq: _Sequence) -> None:
    """Gives back every block `seq` holds (keyed ones stay cached for later prefix hits) and forgets it."""
    # Tail first: blocks released earlier are evicted earlier, so shared prefix blocks stay cached longest.
    self._blocks.release([b for b in reversed(seq.blocks) if b != NULL_PAGE])
    seq.blocks = []
    self._seqs.pop(seq.row, None)

  def _free(self, slot: int, reason: str, error: BaseException | None = None) -> None:
    seq = self._seqs.get(slot)
    if seq is not None:
      self._release(seq)
    super()._free(slot, reason, error)

  def _admit_pending(self) -> None:
    """Starts queued requests, oldest first, while a row is free and the blocks their prompt needs are (a request
    is always admitted when nothing runs: one request fits the pool)."""
    while True:
      with self._lock:
        if not self._pending:
          return
        request = self._pending[0]
        row = next((i for i, r in enumerate(self._slots) if r is None), None)
        if request._cancelled:
          self._pending.popleft()
          self.finished_requests += 1
          request._finish('cancelled')
          continue
        if row is None:
          return
      tokens = request.prompt_ids + request.tokens
      # Keep at least one token to compute: its logits (or the drafter's first round) continue the request.
      keys = blocks_lib.prefix_hashes(tokens[:len(tokens) - 1], self.block_size)
      hits = self._blocks.match(keys)
      if len(hits) < len(keys) and keys[len(hits)] in self._keys_in_flight():
        # A running request is computing the next blocks of this prompt: wait for them rather than compute the
        # same prefix again (a burst of requests sharing a system prompt computes it once).
        self._blocks.release(list(reversed(hits)))
        return
      seq = _Sequence(request=request, row=row, order=self._order, tokens=tokens,
                      key_data=jax.random.key_data(jax.random.split(jax.random.key(request.seed), 1)[0]),
                      computed=len(hits) * self.block_size, blocks=list(hits), keys=keys[:len(hits)],
                      prompt_keys=keys)
      self._free_out_of_window(seq)
      held = [b for b in seq.blocks if b != NULL_PAGE]
      # Blocks to compute the rest of its prompt and decode a first token (vLLM-style: a request that could not
      # finish its prompt would only be preempted again).
      needed = min(len(tokens) // self.block_size + 1, self.blocks_per_request()) - len(held)
      if self._seqs and needed > self._blocks.num_free:
        self._blocks.release(held)
        return
      with self._lock:
        self._pending.popleft()
        self._slots[row] = request
      self._order += 1
      self._seqs[row] = seq
      if not request.tokens:  # a first admission, not a preempted request's return
        self.prompt_tokens += len(request.prompt_ids)
      self.prefix_queried_tokens += len(tokens)
      self.prefix_hit_tokens += seq.computed

  def _keys_in_flight(self) -> set[bytes]:
    """Keys of the prompt blocks running requests are still computing."""
    return {key for seq in self._seqs.values() for key in seq.prompt_keys[len(seq.keys):]}

  def _free_out_of_window(self, seq: _Sequence) -> None:
    """Releases the blocks of a sparse model that every future query (positions >= seq.computed) has left."""
    if self.window is None:
      return
    bs = self.block_size
    first_live = seq.computed - self.window + 1  # the lowest position a future query still sees (globals aside)
    for m in range(min(len(seq.blocks), max(first_live, 0) // bs)):
      if seq.blocks[m] != NULL_PAGE and m * bs >= self.num_global:
        self._blocks.release([seq.blocks[m]])
        seq.blocks[m] = NULL_PAGE

  def _reserve(self, seq: _Sequence, num_tokens: int) -> bool:
    """Allocates the blocks positions seq.computed .. + num_tokens - 1 need (capped at max_len), preempting the
    newest running requests while none is free. False when `seq` itself was preempted."""
    last = min(seq.computed + num_tokens, self.max_len) - 1
    missing = [m for m in range(seq.computed // self.block_size, last // self.block_size + 1)
               if m >= len(seq.blocks) or seq.blocks[m] == NULL_PAGE]
    while True:
      got = self._blocks.allocate(len(missing))
      if got is not None:
        break
      victim = max(self._seqs.values(), key=lambda s: s.order)
      self._preempt(victim)
      if victim is seq:
        return False
    for m, page in zip(missing, got):
      seq.blocks.extend([NULL_PAGE] * (m + 1 - len(seq.blocks)))
      seq.blocks[m] = page
    return True

  def _preempt(self, seq: _Sequence) -> None:
    """Frees `seq`'s blocks and requeues its request first in line; it is recomputed from its tokens so far."""
    self._release(seq)
    self.preemptions += 1
    with self._lock:
      self._slots[seq.row] = None
      self._pending.appendleft(seq.request)

  def _step_all(self) -> None:
    """One engine step: decode (or a speculative round) for every decoding request, and prefill chunks up to the
    budget, oldest requests first; blocks reserved before anything runs."""
    budget = self.prefill_budget
    decode, prefill = [], []
    for seq in sorted(self._seqs.values(), key=lambda s: s.order):
      if seq.row not in self._seqs:  # preempted by an older request's reservation in this loop
        continue
      remaining = len(seq.tokens) - seq.computed  # >= 1: the pending token at least
      if remaining > 1:  # prefilling; a chunk that reaches the end draws the first new token (plain decoding)
        n = min(remaining - (self.drafter is not None), budget)
        if n and self._reserve(seq, n):
          prefill.append((seq, n))
          budget -= n
      elif self._reserve(seq, self.gamma + 1 if self.drafter is not None else 1):
        decode.append(seq)
    live = lambda seqs: [s for s in seqs if self._seqs.get(s.row) is s]  # drop the ones preempted afterwards
    decode, prefill = live(decode), [(s, n) for s, n in prefill if self._seqs.get(s.row) is s]
    if self.record_steps:
      self.step_log.append(dict(step=self.steps, decode=[s.request.id for s in decode],
                                prefill=[(s.request.id, n) for s, n in prefill]))
    for seq, n in prefill:
      if self._seqs.get(seq.row) is seq:  # not failed (or the state rebuilt) by an earlier chunk's error
        self._guarded(self._prefill_chunk, seq.row, seq, n)
    if decode:  # the requests that were decoding when the step began (and got their blocks), not those whose
      # prompts the chunks above just completed: their first new token came from their last chunk
      self._guarded(functools.partial(self._decode, decode))
      for seq in decode:
        self._after_compute(seq)
    self.steps += 1
    self._last_step_at = time.monotonic()
    if self._last_step_at - self._logged_at >= LOG_EVERY_S:
      self._logged_at = self._last_step_at
      self._log_state()

  def _log_state(self) -> None:
    """One line on the cache and the prefix-cache hit rate (every LOG_EVERY_S seconds of work)."""
    stats = self.stats()
    rate = stats['prefix_hit_tokens'] / max(stats['prefix_queried_tokens'], 1)
    logging.info('paged engine: %d running, %d queued; KV blocks %d used, %d cached, %d free of %d; prefix cache '
                 'hit rate %.1f%% (%d of %d prompt tokens); %d preemptions', stats['active'], stats['pending'],
                 stats['kv_blocks_used'], stats['kv_blocks_cached'],
                 stats['kv_blocks_free'] - stats['kv_blocks_cached'],
                 stats['kv_blocks_total'], 100 * rate, stats['prefix_hit_tokens'], stats['prefix_queried_tokens'],
                 stats['preemptions'])

  def _settings(self, seqs: list[_Sequence], rows: int) -> tuple[np.ndarray, ...]:
    """Per-row keys and sampling settings of `seqs`, padded to `rows` rows."""
    keys = np.zeros((rows,) + seqs[0].key_data.shape, np.uint32)
    temperature, top_k, top_p = np.zeros(rows, np.float32), np.zeros(rows, np.int32), np.ones(rows, np.float32)
    for i, seq in enumerate(seqs):
      r = seq.request
      keys[i], temperature[i], top_k[i], top_p[i] = seq.key_data, r.temperature, r.top_k, r.top_p
    return keys, temperature, top_k, top_p

  def _table(self, seqs: list[_Sequence], rows: int) -> np.ndarray:
    table = np.zeros((rows, self.table_width), np.int32)
    for i, seq in enumerate(seqs):
      table[i, :len(seq.blocks)] = seq.blocks[:self.table_width]
    return table

  def _run_feed(self, seqs: list[_Sequence], tokens: np.ndarray, start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Feeds rows of tokens [R, C] and returns each row's drawn token."""
    rows = tokens.shape[0]
    keys, temperature, top_k, top_p = self._settings(seqs, rows)
    all_greedy = bool(np.all(temperature[:len(seqs)] <= 0))
    table = jnp.asarray(self._table(seqs, rows))
    tokens, start, count = jnp.asarray(tokens), jnp.asarray(start), jnp.asarray(count)
    drawn, self._pools = self._feed(self.params, self._pools, tokens, start, count, table, jnp.asarray(keys),
                                    jnp.asarray(temperature), jnp.asarray(top_k), jnp.asarray(top_p),
                                    all_greedy=all_greedy)
    if self.draft_paged:
      self._draft_state = self._feed_draft(self.drafter.params, self._draft_state, tokens, start, count, table)
    return np.asarray(drawn)

  def _prefill_chunk(self, row: int, seq: _Sequence, n: int) -> None:
    """Feeds the next n prompt tokens of `seq`; the chunk that completes the prompt draws the first new token (or,
    with a drafter, sets up the drafter's row)."""
    tokens = np.zeros((1, bucket(n, 1 << 30)), np.int32)  # widths: powers of two (one compile each)
    tokens[0, :n] = seq.tokens[seq.computed:seq.computed + n]
    drawn = self._run_feed([seq], tokens, np.array([seq.computed], np.int32), np.array([n], np.int32))
    seq.computed += n
    if seq.computed == len(seq.tokens) and self.drafter is None:
      self._deliver_drawn(seq, [int(drawn[0])])
    self._after_compute(seq)

  def _init_drafter_row(self, seq: _Sequence) -> None:
    """The drafter's row for `seq` once its prompt is in the cache (its state, the committed-token buffer)."""
    width = bucket(len(seq.tokens), self.max_len)
    committed = np.zeros((1, width), np.int32)
    committed[0, :len(seq.tokens)] = seq.tokens
    self._draft_state, self._tokens = self._draft_init(self.drafter.params, self._draft_state, self._tokens,
                                                       jnp.int32(seq.row), jnp.asarray(committed),
                                                       jnp.int32(len(seq.tokens)))
    seq.draft_ready = True

  def _decode(self, seqs: list[_Sequence]) -> None:
    """Each of `seqs` feeds its pending token (or runs a speculative round) and gets its next tokens."""
    seqs = [s for s in seqs if self._seqs.get(s.row) is s]  # not freed by a failed chunk
    if not seqs:
      return
    if self.drafter is not None:
      self._speculative_step(seqs)
      return
    rows = 1 << (len(seqs) - 1).bit_length()
    tokens = np.zeros((rows, 1), np.int32)
    start, count = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
    for i, seq in enumerate(seqs):
      tokens[i, 0], start[i], count[i] = seq.tokens[seq.computed], seq.computed, 1
    drawn = self._run_feed(seqs, tokens, start, count)
    for i, seq in enumerate(seqs):
      seq.computed += 1
      self._deliver_drawn(seq, [int(drawn[i])])

  def _speculative_step(self, seqs: list[_Sequence]) -> None:
    n = self.num_slots
    for seq in seqs:
      if not seq.draft_ready:
        self._init_drafter_row(seq)
    by_row = {s.row: s for s in seqs if s.draft_ready}
    ordered = [by_row.get(row) for row in range(n)]
    present = [s for s in ordered if s is not None]
    if not present:
      return
    active = np.array([s is not None for s in ordered])
    lengths = np.array([len(s.tokens) if s is not None else 1 for s in ordered], np.int32)
    keys = np.zeros((n,) + present[0].key_data.shape, np.uint32)
    temperature, top_k, top_p = np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32)
    table = np.zeros((n, self.table_width), np.int32)
    for row, seq in enumerate(ordered):
      if seq is not None:
        r = seq.request
        keys[row], temperature[row], top_k[row], top_p[row] = seq.key_data, r.temperature, r.top_k, r.top_p
        table[row, :len(seq.blocks)] = seq.blocks[:self.table_width]
    all_greedy = bool(np.all(temperature[active] <= 0))
    self._pools, self._draft_state, self._tokens, committed, accepted = self._round(
        self.params, self.drafter.params, self._pools, self._draft_state, self._tokens, jnp.asarray(lengths),
        jnp.asarray(table), jnp.asarray(keys), jnp.asarray(temperature), jnp.asarray(top_k), jnp.asarray(top_p),
        jnp.asarray(active), all_greedy=all_greedy)
    committed, accepted = np.asarray(committed), np.asarray(accepted)
    self.proposed += self.gamma * len(present)
    self.accepted += int(accepted[active].sum())
    for seq in present:
      self._deliver_drawn(seq, committed[seq.row, :accepted[seq.row] + 1].tolist())
      seq.computed = len(seq.tokens) - 1

  def _deliver_drawn(self, seq: _Sequence, tokens: list[int]) -> None:
    """Hands new tokens to the request (engine.Engine._deliver: stop ids, limits, cancellation) and appends the ones
    it kept to the sequence."""
    for token in tokens:
      self._pos[seq.row] = len(seq.tokens)
      if not self._deliver(seq.row, seq.request, token):
        return
      seq.tokens.append(token)

  def _after_compute(self, seq: _Sequence) -> None:
    """Keys the blocks `seq` has filled (prefix cache) and frees a sparse model's blocks that left the window."""
    if self._seqs.get(seq.row) is not seq:
      return
    bs = self.block_size
    parent = seq.keys[-1] if seq.keys else None
    for m in range(len(seq.keys), min(seq.computed, len(seq.tokens)) // bs):
      parent = blocks_lib.block_hash(parent, seq.tokens[m * bs:(m + 1) * bs])
      seq.keys.append(parent)
      if m < len(seq.blocks) and seq.blocks[m] != NULL_PAGE:
        self._blocks.register(seq.blocks[m], parent)
    self._free_out_of_window(seq)


def slot_equivalent_blocks(cfg: Any, num_slots: int, max_len: int, block_size: int, extra_slots: int = 0) -> int:
  """KV blocks holding what engine.Engine's `num_slots` rows hold (each row a max_len cache, or a sparse model's
  bounded ring): the paged engine's default pool, so both engines get the same KV memory."""
  return num_slots * math.ceil(cache_lib.cache_length(cfg, max_len, extra_slots) / block_size)


def make_engine(kind: str, model: nn.Module, params: Any, *, num_slots: int, max_len: int, kv_blocks: int = 0,
                block_size: int = 16, max_running: int = 64, prefill_budget: int = 512, **kwargs: Any) -> Engine:
  """The serving engine: kind 'paged' (PagedEngine over `kv_blocks` blocks; 0: the KV memory of `num_slots`
  fixed slots) or 'slots' (engine.Engine with `num_slots` max_len rows). Other keyword arguments (max_queue,
  vocab_limit, drafter, gamma, placement, on_fatal) go to either."""
  if kind == 'slots':
    return Engine(model, params, num_slots=num_slots, max_len=max_len, **kwargs)
  if kind != 'paged':
    raise ValueError(f'engine kind must be "paged" or "slots", got {kind!r}')
  if kv_blocks < 0:
    raise ValueError(f'kv_blocks must be >= 0 (0: the memory of num_slots slots), got {kv_blocks}')
  extra = kwargs.get('gamma', 4) + 1 if kwargs.get('drafter') is not None else 0
  blocks = kv_blocks or slot_equivalent_blocks(model.cfg, num_slots, max_len, block_size, extra)
  return PagedEngine(model, params, num_blocks=blocks, block_size=block_size, max_len=max_len,
                     max_running=max_running, prefill_budget=prefill_budget, **kwargs)
