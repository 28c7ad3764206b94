"""The jit-compiled sampler: batched prefill into a KV cache, then a `lax.while_loop` of one-token decode steps.

Static shapes throughout: prompts are right-padded to one length (per-row lengths), the cache is preallocated
(dsjax/model/cache.py: a full cache, or the bounded num_global + window ring for sparse attention), and the output
is a [B, max_new_tokens] buffer. Rows stop at any of their stop tokens or at their own max length; the loop ends
when every row has. Greedy / temperature / top-k / top-p per row; draws use a key per row folded with the position,
so a row's tokens depend on its prompt, settings and seed only, not on what else is in the batch.
"""
from __future__ import annotations

from typing import Any, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsjax import sharding as sharding_lib
from dsjax.model import cache as cache_lib
from dsjax.model import layout


MIN_TEMPERATURE = 1e-5  # below it, sampling is greedy (as in vLLM): logits / T would overflow float32


def sampling_settings(temperature: Any, top_k: Any, top_p: Any, vocab_size: int) -> tuple[float, int, float]:
  """One row's settings checked and brought into the sampler's dtypes (float32, int32, float32), so no value a
  caller sends can fail on the way to a device array: ValueError naming a bad one; temperature below
  MIN_TEMPERATURE becomes 0 (greedy), top_k >= vocab_size becomes 0 (no top-k filtering)."""
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)):
    raise ValueError(f'temperature must be a number, got {temperature!r}')
  if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.number)):
    raise ValueError(f'top_p must be a number, got {top_p!r}')
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
    raise ValueError(f'top_k must be an integer, got {top_k!r}')
  temperature, top_p, top_k = float(temperature), float(top_p), int(top_k)
  if not 0 <= temperature <= float(np.finfo(np.float32).max):  # NaN fails too
    raise ValueError(f'temperature must be >= 0 and finite in float32, got {temperature}')
  if not 0 < top_p <= 1:
    raise ValueError(f'top_p must be in (0, 1], got {top_p}')
  if top_k < 0:
    raise ValueError(f'top_k must be >= 0, got {top_k}')
  return (0.0 if temperature < MIN_TEMPERATURE else temperature), (0 if top_k >= vocab_size else top_k), top_p


def token_probs(logits_BV: jax.Array, *, temperature: Any = 1.0, top_k: Any = 0, top_p: Any = 1.0,
                vocab_limit: int | None = None) -> jax.Array:
  """The distribution a row samples from, float32 [B, V]: softmax(logits / temperature) restricted to the top_k
  largest logits (0: all) and to the smallest set of largest-probability tokens whose mass reaches top_p,
  renormalised; a one-hot argmax where temperature == 0. Settings are scalars or [B] arrays.

  Speculative decoding's acceptance rule needs exactly this distribution, so sampling goes through it too.
  """
  logits_BV = masked_logits(logits_BV, vocab_limit)
  B, V = logits_BV.shape
  temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (B,))
  top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (B,))
  top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (B,))
  greedy = temperature <= 0
  scaled = logits_BV / jnp.where(greedy, 1.0, temperature)[:, None]
  ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # descending
  k = jnp.where((top_k <= 0) | (top_k > V), V, top_k)
  kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
  sorted_probs = jax.nn.softmax(jnp.where(ordered >= kth, ordered, -jnp.inf), axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  in_nucleus = (mass_before < top_p[:, None]) & (sorted_probs > 0)
  threshold = jnp.min(jnp.where(in_nucleus, ordered, jnp.inf), axis=-1, keepdims=True)
  probs = jax.nn.softmax(jnp.where(scaled >= threshold, scaled, -jnp.inf), axis=-1)
  one_hot = jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), V, dtype=jnp.float32)
  return jnp.where(greedy[:, None], one_hot, probs)


def probs_for(logits_BV: jax.Array, settings: dict[str, Any], all_greedy: bool) -> jax.Array:
  """`token_probs(logits, **settings)`; when every row is greedy (static), the same one-hot argmax without the sort
  and softmax."""
  if all_greedy:
    return jax.nn.one_hot(jnp.argmax(masked_logits(logits_BV, settings.get('vocab_limit')), axis=-1),
                          logits_BV.shape[-1], dtype=jnp.float32)
  return token_probs(logits_BV, **settings)


def next_tokens(logits_BV: jax.Array, settings: dict[str, Any], keys_B: jax.Array, positions_B: jax.Array,
                all_greedy: bool) -> jax.Array:
  """int32 [B]: each row's next token drawn from `token_probs(logits, **settings)` with its key folded with its
  position; when every row is greedy (static), the argmax without the sort, softmax and draw."""
  if all_greedy:
    return jnp.argmax(masked_logits(logits_BV, settings.get('vocab_limit')), axis=-1).astype(jnp.int32)
  return draw(token_probs(logits_BV, **settings), keys_B, positions_B)


def masked_logits(logits_BV: jax.Array, vocab_limit: int | None) -> jax.Array:
  """float32 logits with ids >= vocab_limit (the model's padded vocabulary) masked to -inf."""
  logits_BV = logits_BV.astype(jnp.float32)
  if vocab_limit is not None and vocab_limit < logits_BV.shape[-1]:
    logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab_limit, logits_BV, -jnp.inf)
  return logits_BV


def row_keys(rng: jax.Array, batch: int) -> jax.Array:
  """One key per row from a single key (or the given [B] keys)."""
  return rng if rng.ndim == 1 else jax.random.split(rng, batch)


def draw(probs_BV: jax.Array, keys_B: jax.Array, positions_B: jax.Array) -> jax.Array:
  """One token per row from probs [B, V], with row b's key folded with its position (reproducible per row)."""
  keys = jax.vmap(jax.random.fold_in)(keys_B, positions_B)
  return jax.vmap(lambda key, p: jax.random.categorical(key, jnp.log(p)))(keys, probs_BV).astype(jnp.int32)


def sample_logits(logits_BV: jax.Array, rng: jax.Array, *, temperature: Any, top_k: Any = 0, top_p: Any = 1.0,
                  vocab_limit: int | None = None) -> jax.Array:
  """Draws one token per row from float logits [B, V] (see `token_probs`); temperature 0 is greedy."""
  probs = token_probs(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p, vocab_limit=vocab_limit)
  batch = logits_BV.shape[0]
  return draw(probs, row_keys(rng, batch), jnp.zeros((batch,), jnp.int32))


def pad_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], max_len: int, pad_id: int,
                width: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Right-padded prompt tokens [B, width or longest prompt], lengths [B] and max new tokens [B] (one value or one
  per row), after checking that every prompt is non-empty and fits max_len with its new tokens."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('need at least one prompt and every prompt needs at least one token')
  max_new = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (len(prompts),))
  lengths = np.array([len(p) for p in prompts], np.int32)
  if int((lengths + max_new).max()) > max_len:
    raise ValueError(f'prompt + max_new_tokens = {int((lengths + max_new).max())} tokens exceeds max_len={max_len}')
  tokens = np.full((len(prompts), width or int(lengths.max())), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  return tokens, lengths, max_new


def check_context(cfg: Any, length: int, what: str) -> None:
  """ValueError when `length` positions (prompt + new tokens) exceed a RoPE model's context, model.max_positions:
  positions past it were never trained and decode garbage silently. Transformer-XL encodes distances, not
  positions, and has no such limit."""
  if cfg.positions.kind == 'rope' and length > int(cfg.max_positions):
    raise ValueError(f'{what} = {length} tokens exceeds the model\'s context (model.max_positions='
                     f'{int(cfg.max_positions)}); use fewer new tokens or a shorter prompt')


class Sampler:
  """KV-cached decoding for one model: jitted prefill, cached forward and the whole generation loop.

  Compiled once per (batch, prompt length, max_new_tokens) shape. Params may be in the training layout (as trained
  and saved) or the decoding layout (`dsjax.model.layout.for_decoding`, what the decode loop reads): training params
  are converted inside each call, a copy of the weights per call, so convert them once when you load them for many
  calls. Params may be sharded (e.g. tensor-parallel on a
  mesh): the jitted functions follow their shardings. With a `placement` (dsjax.sharding.Placement), `generate`
  traces under its mesh and rules, so the attention kernels run per shard; `forward` is also traced inside other
  jitted functions, so callers on a mesh call those under the placement (the engine and `speculative_generate`
  do).
  """

  def __init__(self, model: nn.Module, *, max_len: int, extra_slots: int = 0,
               placement: sharding_lib.Placement | None = None):
    check_context(model.cfg, int(max_len), 'max_len')
    self.model = model
    self.max_len = int(max_len)
    self.extra_slots = int(extra_slots)
    self.placement = placement
    self.forward = jax.jit(self._forward)
    self._generate = sharding_lib.placed(
        jax.jit(self._generate_loop, static_argnames=('max_new_tokens', 'vocab_limit', 'all_greedy')), placement)

  def init_cache(self, batch: int) -> cache_lib.Cache:
    return cache_lib.init_cache(self.model.cfg, batch, self.max_len, extra_slots=self.extra_slots)

  def _forward(self, params: Any, cache: cache_lib.Cache, tokens_BT: jax.Array, positions_BT: jax.Array,
               segment_ids_BT: jax.Array) -> tuple[jax.Array, cache_lib.Cache]:
    """Logits [B, T, V] of new tokens given the cache, and the cache with them added (segment 0: not added).
    Training-layout params are converted here (a copy of the weights): loops that call this convert once before."""
    return self.forward_hidden(params, cache, tokens_BT, positions_BT, segment_ids_BT)[:2]

  def forward_hidden(self, params: Any, cache: cache_lib.Cache, tokens_BT: jax.Array, positions_BT: jax.Array,
                     segment_ids_BT: jax.Array) -> tuple[jax.Array, cache_lib.Cache, jax.Array]:
    """`forward` (traced, not jitted) plus the final-normed hidden states [B, T, D] (what a multi-token-prediction
    drafter continues from; jit drops them where nothing reads them)."""
    params = layout.for_decoding(params)
    logits, aux = self.model.apply({'params': params}, tokens_BT, positions_BT, segment_ids_BT, cache=cache)
    return logits, aux['cache'], aux['hidden']

  def prefill(self, params: Any, cache: cache_lib.Cache, tokens_BP: jax.Array,
              lengths_B: jax.Array) -> tuple[jax.Array, cache_lib.Cache]:
    """Right-padded prompts [B, P] with lengths [B] into the cache; returns (logits of each last prompt token
    [B, V], cache)."""
    P = tokens_BP.shape[1]
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), tokens_BP.shape)
    segment_ids = (positions < lengths_B[:, None]).astype(jnp.int32)
    logits, cache = self._forward(params, cache, tokens_BP, positions, segment_ids)
    return jnp.take_along_axis(logits, (lengths_B - 1)[:, None, None], axis=1)[:, 0], cache

  def _generate_loop(self, params, tokens_BP, lengths_B, keys_B, max_new_B, temperature_B, top_k_B, top_p_B,
                     stop_ids, pad_id, *, max_new_tokens, vocab_limit, all_greedy):
    batch = tokens_BP.shape[0]
    params = layout.for_decoding(params)  # once per call, before the loop (a no-op when converted already)
    last_BV, cache = self.prefill(params, self.init_cache(batch), tokens_BP, lengths_B)
    settings = dict(temperature=temperature_B, top_k=top_k_B, top_p=top_p_B, vocab_limit=vocab_limit)
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)

    def cond(state):
      i, _, _, _, done, _ = state
      return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
      i, cache, last_BV, pos_B, done, out = state
      next_B = jnp.where(done, pad_id, next_tokens(last_BV, settings, keys_B, pos_B, all_greedy))
      out = out.at[:, i].set(next_B)
      done = done | jnp.isin(next_B, stop_ids) | (i + 1 >= max_new_B)
      logits, cache = self._forward(params, cache, next_B[:, None], pos_B[:, None],
                                    (~done)[:, None].astype(jnp.int32))
      return i + 1, cache, logits[:, 0], pos_B + 1, done, out

    state = (jnp.int32(0), cache, last_BV, lengths_B, max_new_B <= 0, out)
    return jax.lax.while_loop(cond, body, state)[-1]

  def generate(self, params: Any, prompts: Sequence[Sequence[int]], rng: jax.Array, *,
               max_new_tokens: int | Sequence[int], temperature: float | Sequence[float] = 0.0,
               top_k: int | Sequence[int] = 0, top_p: float | Sequence[float] = 1.0, stop_ids: Sequence[int] = (),
               pad_id: int = 0,
               vocab_limit: int | None = None) -> list[list[int]]:
    """Continues each prompt (token ids) by up to its max_new_tokens; returns the new tokens of each row, without
    the stop token that ended it. Settings are one value or one per row; `rng` is one key or one per row."""
    tokens, lengths, max_new = pad_prompts(prompts, max_new_tokens, self.max_len, pad_id)
    batch = len(prompts)
    per_row = lambda value: list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value] * batch
    rows = [sampling_settings(t, k, p, self.model.cfg.vocab_size)
            for t, k, p in zip(per_row(temperature), per_row(top_k), per_row(top_p), strict=True)]
    temperatures, top_ks, top_ps = (np.asarray(column, dtype) for column, dtype
                                    in zip(zip(*rows), (np.float32, np.int32, np.float32)))
    stops = set(stop_ids)
    out = self._generate(params, jnp.asarray(tokens), jnp.asarray(lengths), row_keys(rng, batch),
                         jnp.asarray(max_new), jnp.asarray(temperatures),
                         jnp.asarray(top_ks), jnp.asarray(top_ps),
                         jnp.asarray(sorted(stops) or [-1], jnp.int32), jnp.int32(pad_id),
                         max_new_tokens=int(max_new.max()), vocab_limit=vocab_limit,
                         all_greedy=bool(np.all(temperatures <= 0)))
    results = []
    for row, new in enumerate(np.asarray(out).tolist()):
      new = new[:int(max_new[row])]
      cut = next((i for i, t in enumerate(new) if t in stops), len(new))
      results.append(new[:cut])
    return results


def generate(model: nn.Module, params: Any, prompts: Sequence[Sequence[int]], rng: jax.Array, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | None = None, pad_id: int = 0, vocab_limit: int | None = None,
             stop_ids: Sequence[int] = (), placement: sharding_lib.Placement | None = None) -> list[list[int]]:
  """One-off convenience over `Sampler` (compiles for this call's shapes): new tokens of each prompt, stopping
  at `eos_id` or any of `stop_ids` (dropped from the result). `placement`: the mesh the params live on."""
  stops = list(stop_ids) + ([] if eos_id is None else [int(eos_id)])
  max_len = max(len(p) for p in prompts) + max_new_tokens
  check_context(model.cfg, max_len, f'the longest prompt ({max(len(p) for p in prompts)} tokens) + max_new_tokens '
                f'({max_new_tokens})')
  return Sampler(model, max_len=max_len, placement=placement).generate(
      params, prompts, rng, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
      stop_ids=stops, pad_id=pad_id, vocab_limit=vocab_limit)


