"""Continuous batching: a fixed set of decode slots (the rows of one batch KV cache) shared by a stream of requests.

  engine = Engine(model, params, num_slots=8, max_len=1024, vocab_limit=tokenizer.vocab_size)
  request = engine.submit(prompt_ids, max_new_tokens=64, temperature=0.0, stop_ids=[tokenizer.eos_id])
  for token in request: ...        # streamed as they are drawn; or request.result() for all of them
  engine.shutdown()

One background thread owns the device state. Each iteration it (a) prefills queued requests into free slots, one at
a time: a jitted function prefills the prompt into a fresh 1-row cache and copies that row into the batch cache at
the slot (dynamic_update_slice; one compile per prompt bucket, powers of two), (b) runs one jitted decode step for
all slots (inactive slots feed segment 0, so nothing is written), (c) hands each active slot's token to its request
and frees a finished slot at once (stop id, max_new_tokens or max_len). A slot's draw uses the request's own key
folded with the position and its own settings (per-row arrays), exactly as `Sampler.generate` does for one prompt,
so a request's tokens do not depend on what else is in the batch.

With a `drafter` (speculative.ModelDrafter or PromptLookupDrafter), each iteration is one speculative round for
all slots instead of one decode step: every slot drafts gamma tokens, one target forward of gamma + 1 tokens per
slot verifies them, and each slot commits its accepted drafts plus one drawn token (rows accept different counts).
The cache then holds every committed token but the last (speculative.py's invariant), a device buffer holds each
slot's tokens for the drafter, and a request's tokens equal `speculative_generate` of its prompt alone (greedy:
plain greedy decoding).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from absl import logging
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsjax import sharding as sharding_lib
from dsjax.model import cache as cache_lib
from dsjax.model import layout
from dsjax.sample import sampler as sampler_lib
from dsjax.sample import speculative

MIN_BUCKET = 8


class QueueFull(Exception):
  """The pending queue holds `max_queue` requests already."""


class EngineClosed(RuntimeError):
  """The engine is shutting down (or its thread died) and takes no new requests."""


class EngineRestarted(RuntimeError):
  """A request's generation was cut short because the engine reset its device state after a failure."""


MAX_CONSECUTIVE_FAILURES = 3  # device-state resets in a row without a good step before the engine gives up


def bucket(length: int, max_len: int) -> int:
  """The padded prompt length a prompt of `length` tokens is prefilled at: the next power of two >= MIN_BUCKET,
  at most max_len (one compile per bucket)."""
  size = MIN_BUCKET
  while size < length:
    size *= 2
  return min(size, max_len)


@dataclasses.dataclass(eq=False)
class Request:
  """A submitted request: iterate it for its new tokens as they come, or wait with `result()`.

  `finish_reason` once done: 'stop' (a stop id, not included in `tokens`), 'length' (max_new_tokens or the
  engine's max_len), 'cancelled', 'timeout' (its deadline passed) or 'error' (then `error` holds the exception).
  """
  id: int
  prompt_ids: list[int]
  max_new_tokens: int
  temperature: float
  top_k: int
  top_p: float
  stop_ids: frozenset[int]
  seed: int
  on_token: Callable[[Request, int | None], None] | None = None
  deadline: float | None = None  # time.monotonic() after which the engine drops it ('timeout')
  tokens: list[int] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  error: BaseException | None = None
  submitted_at: float = dataclasses.field(default_factory=time.perf_counter)
  first_token_at: float | None = None  # time.perf_counter() of the first new token
  finished_at: float | None = None  # time.perf_counter() when it finished
  _events: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue, repr=False)
  _done: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
  _cancelled: bool = False

  @property
  def done(self) -> bool:
    return self._done.is_set()

  def cancel(self) -> None:
    """Asks the engine to drop this request (it finishes with 'cancelled' at the next step, if not done)."""
    self._cancelled = True

  def wait(self, timeout: float | None = None) -> bool:
    return self._done.wait(timeout)

  def result(self, timeout: float | None = None) -> list[int]:
    """All new tokens (without the stop id); raises TimeoutError, or the engine's error."""
    if not self._done.wait(timeout):
      raise TimeoutError(f'request {self.id} not done after {timeout} s')
    if self.error is not None:
      raise self.error
    return list(self.tokens)

  def __iter__(self) -> Iterator[int]:
    """New tokens as the engine draws them; ends when the request is done."""
    while True:
      token = self._events.get()
      if token is None:
        return
      yield token

  # Called from the engine thread only.
  def _emit(self, token: int) -> None:
    if self.first_token_at is None:
      self.first_token_at = time.perf_counter()
    self.tokens.append(token)
    self._events.put(token)
    self._notify(token)

  def _finish(self, reason: str, error: BaseException | None = None) -> None:
    if self._done.is_set():
      return
    self.finish_reason, self.error = reason, error
    self.finished_at = time.perf_counter()
    self._done.set()
    self._events.put(None)
    self._notify(None)

  def _notify(self, token: int | None) -> None:
    if self.on_token is None:
      return
    try:
      self.on_token(self, token)
    except Exception:  # pylint: disable=broad-except
      # E.g. the consumer's event loop is gone; the engine must keep serving the others.
      logging.warning('on_token callback of request %d failed', self.id, exc_info=True)
      self.on_token = None
      self._cancelled = True


class Engine:
  """Continuous-batching decoder over `num_slots` cache rows of up to `max_len` tokens each (prompt + new).

  `vocab_limit`: ids >= it are never drawn (padded vocabularies). `max_queue`: pending requests beyond the slots
  before `submit` raises QueueFull. `drafter` / `gamma`: speculative rounds instead of one-token steps (a ring
  cache gets the gamma + 1 extra slots it needs). `placement` (dsjax.sharding.Placement): the mesh the params live on;
  the device functions trace under it, so the attention kernels run per shard. The thread starts at construction;
  `shutdown` ends it.

  Failures stay with their request where they can: settings are checked and brought into the device dtypes at
  `submit`; an error while prefilling one request fails that request alone. An error in a batch step fails the
  requests then in their slots. Whenever a failure leaves the device state unusable (a donated buffer consumed), the
  engine rebuilds it (fresh cache; in-flight requests fail with EngineRestarted, queued ones are served). After
  MAX_CONSECUTIVE_FAILURES failures in a row, or if rebuilding fails, the engine stops: `health()` says so, queued
  and new requests get EngineClosed, and `on_fatal(error)` (e.g. serve.py exiting non-zero) is called.
  """

  def __init__(self, model: nn.Module, params: Any, *, num_slots: int, max_len: int, max_queue: int = 64,
               vocab_limit: int | None = None, extra_slots: int = 0, drafter: speculative.Drafter | None = None,
               gamma: int = 4, placement: sharding_lib.Placement | None = None,
               on_fatal: Callable[[BaseException], None] | None = None):
    if num_slots < 1 or max_len < 2 or max_queue < 0:
      raise ValueError(f'need num_slots >= 1, max_len >= 2, max_queue >= 0; got {num_slots}, {max_len}, {max_queue}')
    if drafter is not None and gamma < 1:
      raise ValueError(f'gamma={gamma}: need at least 1')
    self.params = layout.for_decoding(params)  # once (dsjax/model/layout.py)
    self.num_slots, self.max_len, self.max_queue = int(num_slots), int(max_len), int(max_queue)
    self.vocab_limit = vocab_limit
    self.vocab_size = int(model.cfg.vocab_size)
    self.on_fatal = on_fatal
    self.drafter, self.gamma = drafter, int(gamma)
    if drafter is not None:
      extra_slots = max(extra_slots, self.gamma + 1)
      drafter.check(self.gamma)
    self.sampler = sampler_lib.Sampler(model, max_len=max_len, extra_slots=extra_slots, placement=placement)

    n = self.num_slots
    # The device functions run in the engine thread, under the placement (the attention kernels run per shard).
    jit = lambda fn, **kw: sharding_lib.placed(jax.jit(fn, **kw), placement)
    if drafter is None:
      self._prefill = jit(self._prefill_into_slot, donate_argnums=(1, 2))
      self._decode = jit(self._decode_step, donate_argnums=(1, 2), static_argnames=('all_greedy',))
    else:
      self._prefill = jit(self._prefill_speculative, donate_argnums=(2, 3, 4))
      self._round = jit(self._speculative_round, donate_argnums=(2, 3, 4), static_argnames=('all_greedy',))
      self._init_draft_state = jit(drafter.init)
    self._slots: list[Request | None] = [None] * n
    self._init_device_state()
    self._start()

  def _start(self) -> None:
    """Host-side state shared by the engines, then the engine thread."""
    self._pending: collections.deque[Request] = collections.deque()
    self._lock = threading.Condition()
    self._ids = itertools.count()
    self._closing = False  # no new requests
    self._cancel_all = False  # drop pending and active requests
    self._error: BaseException | None = None
    self.steps = 0
    self.proposed = self.accepted = 0  # speculative drafts proposed / accepted (row rounds * gamma / accepted)
    self.restarts = 0  # device-state rebuilds after failures
    self.failed_requests = 0  # requests finished with 'error'
    self.finished_requests = 0  # requests done, for any reason
    self.prompt_tokens = 0  # prompt tokens of admitted requests
    self.generated_tokens = 0  # tokens handed to requests
    self._failures = 0  # failures since the last good step
    self._last_step_at: float | None = None  # time.monotonic() of the last completed step
    self._busy_since: float | None = None  # time.monotonic() when the device call in flight started
    self._thread = threading.Thread(target=self._run, name='dsjax-engine', daemon=True)
    self._thread.start()

  def _init_device_state(self) -> None:
    """A fresh batch cache (and drafter state), and idle per-slot host state."""
    n = self.num_slots
    self._cache = self.sampler.init_cache(n)
    if self.drafter is None:
      self._last = jnp.zeros((n, self.vocab_size), jnp.float32)  # logits each slot draws its next token from
    else:
      empty = jnp.zeros((n, 1), jnp.int32)
      self._draft_state = self._init_draft_state(self.drafter.params, empty, jnp.ones((n,), jnp.int32))
      self._tokens = jnp.zeros((n, self.max_len), jnp.int32)  # each slot's committed tokens, for the drafter
    # Per-slot host state, sent with every decode step (a few bytes per slot). _pos: the position the slot feeds
    # next (plain decoding) or its committed token count (speculative rounds).
    self._pos = np.zeros(n, np.int32)
    self._keys = np.zeros((n,) + jax.random.key_data(jax.random.key(0)).shape, np.uint32)
    self._temperature = np.zeros(n, np.float32)
    self._top_k = np.zeros(n, np.int32)
    self._top_p = np.ones(n, np.float32)

  def _device_state(self) -> list[Any]:
    state = [self._cache] + ([self._last] if self.drafter is None else [self._draft_state, self._tokens])
    return jax.tree.leaves(state)

  # ---- public API ----

  def submit(self, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_ids: Sequence[int] = (), seed: int = 0,
             on_token: Callable[[Request, int | None], None] | None = None,
             timeout: float | None = None) -> Request:
    """Queues a request (thread-safe). New tokens stop at max_new_tokens, a stop id, or when prompt + new tokens
    reach max_len. `on_token(request, token)` (optional) is called from the engine thread for each token and with
    None when the request is done; keep it quick. `timeout`: seconds from now after which the request is dropped
    ('timeout'), queued or running. Every setting is checked here and brought into the device dtypes (a seed is
    taken modulo 2**32, as jax.random.key does; top_k >= the vocabulary means no top-k; temperature below
    sampler.MIN_TEMPERATURE is greedy), so no request can fail the engine thread. Raises ValueError, QueueFull or
    EngineClosed."""
    prompt = _int_list(prompt_ids, 'prompt_ids')
    if not prompt:
      raise ValueError('the prompt needs at least one token')
    bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
    if bad is not None:
      raise ValueError(f'prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})')
    if len(prompt) >= self.max_len:
      raise ValueError(f'prompt of {len(prompt)} tokens leaves no room to generate (max_len={self.max_len})')
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be an integer >= 1, got {max_new_tokens!r}')
    temperature, top_k, top_p = sampler_lib.sampling_settings(temperature, top_k, top_p,
                                                              self.vocab_limit or self.vocab_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
      raise ValueError(f'seed must be an integer, got {seed!r}')
    if timeout is not None and not timeout > 0:
      raise ValueError(f'timeout must be > 0 seconds, got {timeout!r}')
    request = Request(id=next(self._ids), prompt_ids=prompt, max_new_tokens=min(int(max_new_tokens), self.max_len),
                      temperature=temperature, top_k=top_k, top_p=top_p,
                      stop_ids=frozenset(_int_list(stop_ids, 'stop_ids')), seed=int(seed) % 2**32,
                      on_token=on_token, deadline=None if timeout is None else time.monotonic() + float(timeout))
    with self._lock:
      if self._closing or self._error is not None:
        raise EngineClosed('the engine is shut down' if self._error is None else f'the engine failed: {self._error}')
      free = sum(slot is None for slot in self._slots)
      if len(self._pending) >= self.max_queue + free:
        raise QueueFull(f'{len(self._pending)} requests are already waiting (max_queue={self.max_queue})')
      self._pending.append(request)
      self._lock.notify_all()
    return request

  def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, **kwargs: Any) -> list[int]:
    """Submits one request and waits for its tokens."""
    return self.submit(prompt_ids, max_new_tokens, **kwargs).result()

  def stats(self) -> dict[str, int]:
    with self._lock:
      return dict(active=sum(slot is not None for slot in self._slots), pending=len(self._pending), steps=self.steps,
                  proposed=self.proposed, accepted=self.accepted, restarts=self.restarts,
                  failed_requests=self.failed_requests, finished_requests=self.finished_requests,
                  prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens)

  def health(self, stall_timeout: float | None = None) -> dict[str, Any]:
    """The engine's state for a health check: `ok` is False once the engine thread has ended (failed or shut down)
    or when one device call has run longer than `stall_timeout` seconds (a hung device); `error` says why;
    `last_step_s`: seconds since the last completed step (None before the first), `busy_s`: how long the device
    call in flight has run (None when idle)."""
    now = time.monotonic()
    with self._lock:
      busy = None if self._busy_since is None else now - self._busy_since
      last = None if self._last_step_at is None else now - self._last_step_at
      error = None
      if self._error is not None:
        error = f'the engine failed: {type(self._error).__name__}: {self._error}'
      elif not self._thread.is_alive() or self._closing:
        error = 'the engine is shut down'
      elif stall_timeout is not None and busy is not None and busy > stall_timeout:
        error = f'a device call has run for {busy:.0f} s (stall timeout {stall_timeout:g} s)'
      return dict(ok=error is None, error=error, thread_alive=self._thread.is_alive(),
                  last_step_s=None if last is None else round(last, 3), busy_s=None if busy is None else round(busy, 3),
                  restarts=self.restarts)

  def shutdown(self, cancel: bool = True, timeout: float | None = 30.0) -> None:
    """Stops taking requests; cancel=True drops pending and in-flight ones ('cancelled'), cancel=False finishes
    them first (cancelling whatever is left after `timeout` seconds). Joins the engine thread. Idempotent."""
    with self._lock:
      self._closing = True
      self._cancel_all = self._cancel_all or cancel
      self._lock.notify_all()
    if not cancel and timeout is not None:
      self._thread.join(timeout)
      with self._lock:
        self._cancel_all = True
        self._lock.notify_all()
    # A step in flight finishes first: seconds at most, unless the device hangs.
    self._thread.join(None if timeout is None else max(timeout, 10.0))
    if self._thread.is_alive():
      logging.warning('engine thread still running after shutdown(timeout=%s)', timeout)

  # ---- jitted device functions ----

  def _prefill_into_slot(self, params, cache, last_NV, slot, tokens_1P, length):
    """Prompt [1, P] (right-padded, `length` real tokens) prefilled into a fresh 1-row cache that replaces row
    `slot` of the batch cache (so nothing of the slot's previous request survives); the slot's last logits [V]
    go to last_NV. Returns (cache, last_NV)."""
    last_1V, row = self.sampler.prefill(params, self.sampler.init_cache(1), tokens_1P, length[None])
    cache = cache_lib.insert_row(cache, row, slot)
    return cache, last_NV.at[slot].set(last_1V[0].astype(last_NV.dtype))

  def _decode_step(self, params, cache, last_NV, pos_N, keys_N, temperature_N, top_k_N, top_p_N, active_N, *,
                   all_greedy):
    """Every slot draws its next token [N] from last_NV (key folded with its position) and feeds it at pos_N;
    inactive slots get segment 0 (not written). Returns (tokens [N], cache, next logits [N, V])."""
    settings = dict(temperature=temperature_N, top_k=top_k_N, top_p=top_p_N, vocab_limit=self.vocab_limit)
    tokens = sampler_lib.next_tokens(last_NV, settings, jax.random.wrap_key_data(keys_N), pos_N, all_greedy)
    tokens = jnp.where(active_N, tokens, 0)
    logits, cache = self.sampler.forward(params, cache, tokens[:, None], pos_N[:, None],
                                         active_N[:, None].astype(jnp.int32))
    return tokens, cache, logits[:, 0].astype(last_NV.dtype)

  def _prefill_speculative(self, params, draft_params, cache, draft_state, tokens_NL, slot, tokens_1P, length):
    """Prompt [1, P] (`length` real tokens) into slot `slot`: the target cache gets all but its last token (the
    pending one), the drafter its own state, the token buffer the prompt. Returns (cache, draft_state, tokens)."""
    lengths = length[None]
    row, hidden = speculative.prefill_with_hidden(self.sampler, params, tokens_1P, lengths)
    draft_row = self.drafter.init(draft_params, tokens_1P, lengths, hidden)
    tokens_NL = jax.lax.dynamic_update_slice(tokens_NL, tokens_1P[:, :self.max_len], (slot, jnp.int32(0)))
    return (cache_lib.insert_row(cache, row, slot), self.drafter.insert_row(draft_state, draft_row, slot), tokens_NL)

  def _speculative_round(self, params, draft_params, cache, draft_state, tokens_NL, n_N, keys_N, temperature_N,
                         top_k_N, top_p_N, active_N, *, all_greedy):
    """One speculative round for every slot (speculative.speculative_round with the slots' own keys and settings).
    Returns (cache, draft_state, tokens, committed [N, gamma + 1], accepted counts [N])."""
    settings = dict(temperature=temperature_N, top_k=top_k_N, top_p=top_p_N, vocab_limit=self.vocab_limit)
    keys = speculative.stream_keys(jax.random.wrap_key_data(keys_N))
    return speculative.speculative_round(self.sampler, self.drafter, params, draft_params, cache, draft_state,
                                         tokens_NL, jnp.maximum(n_N, 1), active_N, keys, settings, gamma=self.gamma,
                                         all_greedy=all_greedy)

  # ---- engine thread ----

  def _run(self) -> None:
    try:
      while (expired := self._wait_for_work()) is not None:
        self._expire(expired)
        with self._lock:
          admitted = []
          for slot in range(self.num_slots):
            if self._slots[slot] is None and self._pending:
              request = self._pending.popleft()
              self._slots[slot] = request
              admitted.append((slot, request))
        for slot, request in admitted:
          self._guarded(self._admit, slot, request)
        if self._has_active():
          self._guarded(self._step)
    except BaseException as e:  # pylint: disable=broad-except
      self._thread_failed(e)
    self._wind_down()

  def _wait_for_work(self) -> list[Request] | None:
    """(Engine thread.) Blocks until there is work; None when the thread should end, else the requests whose
    deadline passed (removed from the queue and their slots)."""
    with self._lock:
      while not self._cancel_all and not self._pending and not self._has_active() and not self._closing:
        self._lock.wait()
      if self._cancel_all or (self._closing and not self._pending and not self._has_active()):
        return None
      return self._pop_expired()

  def _expire(self, expired: list[Request]) -> None:
    for request in expired:
      self.finished_requests += 1
      request._finish('timeout')

  def _thread_failed(self, error: BaseException) -> None:
    logging.exception('engine thread failed')
    with self._lock:
      self._error = error

  def _wind_down(self) -> None:
    """(The engine thread's last act.) Finishes every queued and running request, then reports a fatal error."""
    with self._lock:
      self._closing = True
      leftovers = list(self._pending) + [r for r in self._slots if r is not None]
      self._pending.clear()
      self._slots = [None] * self.num_slots
    for request in leftovers:
      self.finished_requests += 1
      request._finish('error' if self._error is not None else 'cancelled', self._error)
    if self._error is not None and self.on_fatal is not None:
      self.on_fatal(self._error)

  def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
    """Runs one admission or step. On an exception: an admission fails its own request; a step fails the requests
    in the slots. If the exception consumed device state (donated buffers), the state is rebuilt and every slot's
    request fails (EngineRestarted); queued requests stay. Re-raises (ending the engine) after
    MAX_CONSECUTIVE_FAILURES failures in a row, or if the rebuild fails."""
    with self._lock:
      self._busy_since = time.monotonic()
    try:
      fn(*args)
      failure = None
    except Exception as e:  # pylint: disable=broad-except
      failure = e
    finally:
      with self._lock:
        self._busy_since = None
    if failure is None:
      if not args:  # a good step
        self._failures = 0
      return
    logging.exception('engine %s failed', 'admission' if args else 'step', exc_info=failure)
    if args:  # an admission: its own request
      self._fail(args[0], failure)
    else:
      for slot, request in enumerate(self._slots):
        if request is not None:
          self._fail(slot, failure)
    damaged = any(leaf.is_deleted() for leaf in self._device_state())
    if damaged or not args:  # an admission that left the state usable is that request's problem alone
      self._failures += 1
    if damaged:
      restart = EngineRestarted(f'the engine reset its device state after an error: {type(failure).__name__}: '
                                f'{failure}')
      for slot, request in enumerate(self._slots):
        if request is not None:
          self._fail(slot, restart)
      self._init_device_state()  # raises (ends the engine) if the device cannot even hold a fresh cache
      self.restarts += 1
      logging.warning('engine device state rebuilt (%d restarts)', self.restarts)
    if self._failures >= MAX_CONSECUTIVE_FAILURES:
      raise RuntimeError(f'{self._failures} engine failures in a row; the last: {type(failure).__name__}: '
                         f'{failure}') from failure

  def _pop_expired(self) -> list[Request]:
    """(Under the lock.) Queued requests past their deadline, removed from the queue; running ones are freed."""
    now = time.monotonic()
    expired = [r for r in self._pending if r.deadline is not None and now > r.deadline]
    for request in expired:
      self._pending.remove(request)
    for slot, request in enumerate(self._slots):
      if request is not None and request.deadline is not None and now > request.deadline:
        self._slots[slot] = None
        expired.append(request)
    return expired

  def _has_active(self) -> bool:
    return any(slot is not None for slot in self._slots)

  def _admit(self, slot: int, request: Request) -> None:
    """Prefills `request` into `slot` and sets the slot's sampling state (a cancelled request just frees it)."""
    if request._cancelled:
      self._free(slot, 'cancelled')
      return
    length = len(request.prompt_ids)
    self.prompt_tokens += length
    tokens = np.zeros((1, bucket(length, self.max_len)), np.int32)
    tokens[0, :length] = request.prompt_ids
    if self.drafter is None:
      self._cache, self._last = self._prefill(self.params, self._cache, self._last, jnp.int32(slot),
                                              jnp.asarray(tokens), jnp.int32(length))
    else:
      self._cache, self._draft_state, self._tokens = self._prefill(
          self.params, self.drafter.params, self._cache, self._draft_state, self._tokens, jnp.int32(slot),
          jnp.asarray(tokens), jnp.int32(length))
    # As Sampler.generate for this prompt alone: row_keys(key(seed), 1)[0].
    self._keys[slot] = jax.random.key_data(jax.random.split(jax.random.key(request.seed), 1)[0])
    self._pos[slot] = length
    self._temperature[slot], self._top_k[slot], self._top_p[slot] = request.temperature, request.top_k, request.top_p

  def _step(self) -> None:
    active = np.array([r is not None for r in self._slots])
    args = (jnp.asarray(np.where(active, self._pos, 0)), jnp.asarray(self._keys), jnp.asarray(self._temperature),
            jnp.asarray(self._top_k), jnp.asarray(self._top_p), jnp.asarray(active))
    all_greedy = bool(np.all(self._temperature[active] <= 0))  # two compiles at most: argmax or sampling
    if self.drafter is None:
      tokens, self._cache, self._last = self._decode(self.params, self._cache, self._last, *args,
                                                     all_greedy=all_greedy)
      tokens, counts = np.asarray(tokens)[:, None], np.ones(self.num_slots, np.int32)
    else:
      self._cache, self._draft_state, self._tokens, tokens, accepted = self._round(
          self.params, self.drafter.params, self._cache, self._draft_state, self._tokens, *args,
          all_greedy=all_greedy)
      tokens, accepted = np.asarray(tokens), np.asarray(accepted)
      counts = accepted + 1
      self.proposed += self.gamma * int(active.sum())
      self.accepted += int(accepted[active].sum())
    self.steps += 1
    self._last_step_at = time.monotonic()
    for slot, request in enumerate(self._slots):
      if request is not None:
        for token in tokens[slot, :counts[slot]].tolist():
          if not self._deliver(slot, request, token):
            break

  def _deliver(self, slot: int, request: Request, token: int) -> bool:
    """Hands one new token of `slot` to its request; False once the slot is freed."""
    self._pos[slot] += 1
    if request._cancelled:
      self._free(slot, 'cancelled')
    elif token in request.stop_ids:
      self._free(slot, 'stop')
    else:
      request._emit(token)
      self.generated_tokens += 1
      if len(request.tokens) >= request.max_new_tokens or self._pos[slot] >= self.max_len:
        self._free(slot, 'length')
    return self._slots[slot] is request

  def _free(self, slot: int, reason: str, error: BaseException | None = None) -> None:
    request = self._slots[slot]
    with self._lock:
      self._slots[slot] = None
      self.finished_requests += 1
    request._finish(reason, error)

  def _fail(self, slot: int, error: BaseException) -> None:
    if self._slots[slot] is not None:
      self.failed_requests += 1
      self._free(slot, 'error', error)


def _int_list(values: Any, name: str) -> list[int]:
  """`values` as a list of Python ints; ValueError naming `name` for anything else (bools, floats, strings)."""
  try:
    items = list(values)
  except TypeError:
    raise ValueError(f'{name} must be a sequence of integers, got {type(values).__name__}') from None
  bad = next((v for v in items if isinstance(v, bool) or not isinstance(v, (int, np.integer))), None)
  if bad is not None:
    raise ValueError(f'{name} must hold integers only, got {bad!r}')
  return [int(v) for v in items]
