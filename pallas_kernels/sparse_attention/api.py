"""Public entry point: `sparse_attention` with a custom VJP over the Pallas kernels."""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_attention import gpu
from pallas_kernels.sparse_attention.live_pairs import dkv_live_pairs, live_pairs
from pallas_kernels.sparse_attention.reference import sparse_attention_reference
from pallas_kernels.sparse_attention.schedule import make_schedule, transpose_schedule


class FlashConfig(NamedTuple):
  """Static settings of one kernel call (hashable: it is a nondiff argument of the custom VJP)."""
  window: int | None
  num_global: int
  scale: float
  softcap: float | None
  block_q: int
  block_k: int
  backend: str  # 'gpu' (Triton) or 'tpu' (Mosaic TPU)
  interpret: bool
  num_warps: int | None = None  # Triton launch settings (None: Pallas' defaults); ignored by Mosaic TPU
  num_stages: int | None = None


TPU_BLOCKS = (512, 256, 128)  # Mosaic lane tiles are multiples of 128; wider blocks amortise the step overhead


def tpu_block(t: int) -> int:
  """The default Mosaic TPU block (query and key) for t tokens: the largest of TPU_BLOCKS that divides t rounded up
  to 128, so padding never exceeds what 128-blocks need (t = 32768: 512; t = 640: 128). A 512-wide key block is
  computed in 128-column chunks (tpu.compute_chunk), as splash attention's block_kv / block_kv_compute."""
  padded = -(-t // 128) * 128
  return next(b for b in TPU_BLOCKS if padded % b == 0)


def default_backend() -> str:
  """The kernel backend for the default device: 'tpu' on a TPU, else 'gpu' (interpreted off-GPU)."""
  return 'tpu' if jax.default_backend() == 'tpu' else 'gpu'


def _kernels(backend):
  if backend == 'tpu':
    from pallas_kernels.sparse_attention import tpu  # pylint: disable=g-import-not-at-top
    return tpu
  return gpu


def padded_length(t: int, block_q: int, block_k: int) -> int:
  """The smallest multiple of both block sizes that holds t tokens."""
  m = block_q * block_k // math.gcd(block_q, block_k)
  return -(-t // m) * m


def pad_tokens(x: jax.Array, length: int, value=0, axis: int = 1) -> jax.Array:
  """Pads axis `axis` of x to `length` with `value` (padded tokens get segment -1, position 0)."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def block_schedule(q_pos, q_seg, cfg: FlashConfig, q_index=None, k_pos=None, k_seg=None, group=1):
  """Forward schedule for padded query metadata: [B, T] -> [B, nq, 4], or per head [B, N, T] -> [B, N, nq, 4].

  With backend 'tpu' and key metadata k_pos, k_seg [B, T], a pair of live_pairs.LivePairs (forward/dq lists,
  dk/dv lists for `group` = N // K query heads per kv head): the Mosaic kernels walk the live pairs.
  """
  kw = dict(block_q=cfg.block_q, block_k=cfg.block_k, window=cfg.window, num_global=cfg.num_global)
  if cfg.backend == 'tpu' and k_pos is not None:
    return (live_pairs(q_pos, q_seg, k_pos, k_seg, q_index=q_index, **kw),
            dkv_live_pairs(q_pos, q_seg, k_pos, k_seg, q_index=q_index, group=group, **kw))
  if q_pos.ndim == 2:
    return make_schedule(q_pos, q_seg, q_index=q_index, **kw)
  B, N, T = q_pos.shape
  flat = lambda x: None if x is None else x.reshape(B * N, T)
  sched = make_schedule(flat(q_pos), flat(q_seg), q_index=flat(q_index), **kw)
  return sched.reshape(B, N, *sched.shape[1:])


def _transposed(sched, num_k_blocks):
  if sched.ndim == 3:
    return transpose_schedule(sched, num_k_blocks)
  B, N = sched.shape[:2]
  return transpose_schedule(sched.reshape(B * N, *sched.shape[2:]), num_k_blocks).reshape(B, N, num_k_blocks, 2)


def _kernel_kw(cfg):
  kw = dict(scale=cfg.scale, block_q=cfg.block_q, block_k=cfg.block_k, window=cfg.window,
            num_global=cfg.num_global, softcap=cfg.softcap, interpret=cfg.interpret)
  if cfg.backend == 'gpu':
    kw.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  return kw


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def flash_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, sched, cfg: FlashConfig):
  """The kernels on padded inputs (see gpu.py for shapes, including per-head query metadata) -> out [B,T,N,H].

  Backward is flash-style: the dq and dk/dv kernels recompute probabilities from the saved logsumexp.
  """
  return _flash_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, sched, cfg)[0]


def _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, sched, cfg):
  """(out, lse) of the forward kernel; `sched` a pair of live-pair lists selects the TPU live-pair grids."""
  if isinstance(sched, tuple):
    from pallas_kernels.sparse_attention import tpu  # pylint: disable=g-import-not-at-top
    return tpu.flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, sched[0], **_kernel_kw(cfg))
  return _kernels(cfg.backend).flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, sched, **_kernel_kw(cfg))


def _flash_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, sched, cfg):
  out, lse = _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, sched, cfg)
  return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, sched, out, lse)


def _flash_bwd(cfg, res, do):
  q, k, v, q_pos, k_pos, q_seg, k_seg, sched, out, lse = res
  no_grad = jax.tree.map(lambda _: None, sched)
  if isinstance(sched, tuple):
    from pallas_kernels.sparse_attention import tpu  # pylint: disable=g-import-not-at-top
    pairs, dkv_pairs = sched
    args = (q, k, v, q_pos, k_pos, q_seg, k_seg)
    dq = tpu.flash_dq(*args, pairs, out, lse, do, **_kernel_kw(cfg))
    dk, dv = tpu.flash_dkv(*args, dkv_pairs, out, lse, do, **_kernel_kw(cfg))
    return dq, dk, dv, None, None, None, None, no_grad
  tsched = _transposed(sched, k.shape[1] // cfg.block_k)
  dq, dk, dv = _kernels(cfg.backend).flash_backward(q, k, v, q_pos, k_pos, q_seg, k_seg, sched, tsched, out,
                                                    lse, do, **_kernel_kw(cfg))
  return dq, dk, dv, None, None, None, None, no_grad


flash_attention.defvjp(_flash_fwd, _flash_bwd)


def kernel_config(q, *, window, num_global, scale, softcap, block_q, block_k, backend, interpret, num_warps=None,
                  num_stages=None) -> FlashConfig:
  """Validates the kernel settings shared by sparse and routed attention and fills the defaults."""
  if backend is None:
    backend = default_backend()
  if backend not in ('gpu', 'tpu'):
    raise ValueError(f"backend must be None, 'gpu', 'tpu' or 'reference'; got {backend!r}")
  if backend == 'gpu':  # each unset launch setting from the per-(head_dim, dtype, mask kind) table
    tiles = gpu.default_tiles(q.shape[-1], q.dtype, window)
    block_q, block_k, num_warps, num_stages = (t if x is None else x for x, t in
                                               zip((block_q, block_k, num_warps, num_stages), tiles))
  if backend == 'tpu':
    block_q, block_k = (tpu_block(q.shape[1]) if x is None else x for x in (block_q, block_k))
  if int(block_q) != block_q or int(block_k) != block_k or block_q < 1 or block_k < 1:
    raise ValueError(f'block sizes must be positive ints; got block_q={block_q}, block_k={block_k}')
  if interpret is None:
    interpret = jax.default_backend() != backend
  for name, value in (('num_warps', num_warps), ('num_stages', num_stages)):
    if value is not None and (int(value) != value or value < 1):
      raise ValueError(f'{name} must be None or a positive int; got {value!r}')
  return FlashConfig(None if window is None else int(window), int(num_global),
                     float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale),
                     None if softcap is None else float(softcap), int(block_q), int(block_k), backend,
                     bool(interpret), None if num_warps is None else int(num_warps),
                     None if num_stages is None else int(num_stages))


def _validate(q, k, v, q_pos, k_pos, q_seg, k_seg, window, num_global, softcap=None):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f'q, k, v must be 4-D [B, T, N, H] / [B, S, K, H]; got {q.shape}, {k.shape}, '
                     f'{v.shape}')
  B, T, N, H = q.shape
  if k.shape != v.shape:
    raise ValueError(f'k and v must have the same shape; got {k.shape} and {v.shape}')
  Bk, S, K, Hk = k.shape
  if Bk != B:
    raise ValueError(f'batch mismatch: q has {B}, k/v have {Bk}')
  if Hk != H:
    raise ValueError(f'head_dim mismatch: q has {H}, k/v have {Hk}')
  if K == 0 or N % K:
    raise ValueError(f'num kv heads K={K} must divide num query heads N={N}')
  for name, x, L in (('q_pos', q_pos, T), ('q_seg', q_seg, T), ('k_pos', k_pos, S),
                     ('k_seg', k_seg, S)):
    if tuple(x.shape) != (B, L):
      raise ValueError(f'{name} must have shape {(B, L)}; got {tuple(x.shape)}')
  if window is not None and (int(window) != window or window < 1):
    raise ValueError(f'window must be None or a positive int; got {window!r}')
  if int(num_global) != num_global or num_global < 0:
    raise ValueError(f'num_global must be a non-negative int; got {num_global!r}')
  if softcap is not None and not softcap > 0:
    raise ValueError(f'softcap must be None or positive; got {softcap!r}')


def sparse_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window=None, num_global=0, scale=None,
                     softcap=None, block_q=None, block_k=None, backend=None, interpret=None, num_warps=None,
                     num_stages=None):
  """Block-sparse attention. q [B,T,N,H], k/v [B,S,K,H] (K | N), positions/segments int32 [B,T]/[B,S].

  Key j is visible to query i iff q_seg == k_seg (segment -1 never matches), k_pos <= q_pos and
  (window is None or q_pos - k_pos < window or k_pos < num_global). Scores are scale * q.k (scale default
  1/sqrt(H)), soft-capped to softcap * tanh(s / softcap) when softcap is set. Softmax in float32, rows with
  no visible key give 0, output in q.dtype.

  backend: 'gpu' (Pallas Triton kernels), 'tpu' (Pallas Mosaic TPU kernels) or 'reference' (dense jnp);
  None picks 'tpu' on a TPU and 'gpu' elsewhere. The kernel paths are self-attention over packed rows: they
  need S == T, and their block schedule assumes documents are contiguous runs with positions increasing by 1
  (see schedule.py); the element mask itself is exact.
  block_q, block_k, num_warps, num_stages: kernel tiles and Triton launch settings; each None comes, on GPU, from
  `gpu.default_tiles(head_dim, dtype, window)` (the `gpu.TILES` table, e.g. 128 x 64 tiles, 8 warps, 2 stages at
  head_dim 128 bf16; 64 x 64 and Pallas' default warps / stages for shapes not in it), on TPU `tpu_block(T)` for
  both (512 x 512 at long T, computed in 128-column chunks).
  interpret: None -> True unless the default device is the kernel's backend (so CPU runs the kernels in Pallas
  interpret mode).
  """
  _validate(q, k, v, q_pos, k_pos, q_seg, k_seg, window, num_global, softcap)
  if backend == 'reference':
    return sparse_attention_reference(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window,
                                      num_global=int(num_global), scale=scale, softcap=softcap)
  cfg = kernel_config(q, window=window, num_global=num_global, scale=scale, softcap=softcap, block_q=block_q,
                      block_k=block_k, backend=backend, interpret=interpret, num_warps=num_warps,
                      num_stages=num_stages)
  padded = _padded_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg, cfg)
  return flash_attention(*padded, cfg)[:, :q.shape[1]]


def sparse_attention_with_lse(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window=None, num_global=0, scale=None,
                              softcap=None, block_q=None, block_k=None, backend=None, interpret=None, num_warps=None,
                              num_stages=None):
  """Forward only (no VJP; for inference): `sparse_attention`'s output and each query row's log-sum-exp of its
  visible scores, lse float32 [B, N, T] (-inf where the row sees no key: in self-attention, segment -1 rows).

  With the lse, attention over a key set split in parts (a prompt chunk and the KV cache it continues) is
  the `merge_attention` of the parts, exactly. Same arguments as `sparse_attention`; backend 'reference' is the
  dense jnp computation.
  """
  _validate(q, k, v, q_pos, k_pos, q_seg, k_seg, window, num_global, softcap)
  if backend == 'reference':
    return sparse_attention_reference(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window,
                                      num_global=int(num_global), scale=scale, softcap=softcap, return_lse=True)
  cfg = kernel_config(q, window=window, num_global=num_global, scale=scale, softcap=softcap, block_q=block_q,
                      block_k=block_k, backend=backend, interpret=interpret, num_warps=num_warps,
                      num_stages=num_stages)
  T = q.shape[1]
  out, lse = _forward(*_padded_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg, cfg), cfg)
  # In self-attention a row with segment != -1 sees at least itself; the kernels write lse 0 for empty rows.
  lse = jnp.where(q_seg[:, None, :] == -1, -jnp.inf, lse[:, :, :T])
  return out[:, :T], lse


def _padded_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg, cfg):
  """(q, k, v, q_pos, k_pos, q_seg, k_seg, sched) padded to a multiple of the blocks (padding: segment -1)."""
  T = q.shape[1]
  if k.shape[1] != T:
    raise ValueError(f'the kernel path is self-attention and needs S == T; got S={k.shape[1]}, T={T}')
  Tp = padded_length(T, cfg.block_q, cfg.block_k)
  pad = functools.partial(pad_tokens, length=Tp)
  q_pos, k_pos = pad(q_pos.astype(jnp.int32)), pad(k_pos.astype(jnp.int32))
  q_seg, k_seg = pad(q_seg.astype(jnp.int32), value=-1), pad(k_seg.astype(jnp.int32), value=-1)
  return (pad(q), pad(k), pad(v), q_pos, k_pos, q_seg, k_seg,
          block_schedule(q_pos, q_seg, cfg, k_pos=k_pos, k_seg=k_seg, group=q.shape[2] // k.shape[2]))
