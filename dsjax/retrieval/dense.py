"""Dense retrieval with the language model's own hidden states, searched exactly with faiss.

A text's vector is the mean of the model's final-normed hidden states (`aux['hidden']`) over its tokens ([bos] +
tokens, cut to `max_tokens`), L2-normalised, so the inner product of two vectors is their cosine similarity and
faiss's exact `IndexFlatIP` ranks by cosine. Rows are right-padded to a few fixed lengths (powers of two) and the
batch to 1 or `batch_size` rows, so the jitted forward compiles only a handful of shapes; padding carries segment
id 0 and, attention being causal, never changes the real tokens' states.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import faiss
import jax
import jax.numpy as jnp
import numpy as np

MIN_BUCKET = 16
PROBE_TEXT = 'def probe(path):\n  """Reads the file at path."""\n  return open(path).read()\n'
PROBE_TOLERANCE = 0.05  # max |difference| of the probe vector's entries between index and served model


def length_buckets(max_tokens: int) -> list[int]:
  """Row lengths a batch is padded to: powers of two from MIN_BUCKET, then max_tokens itself."""
  buckets = []
  n = MIN_BUCKET
  while n < max_tokens:
    buckets.append(n)
    n *= 2
  return buckets + [max_tokens]


class Embedder:
  """texts -> float32 [N, D] unit vectors: mean-pooled final hidden states of `model` (see the module doc).

  `max_tokens` (default and cap: the model's max_positions, at most 512) limits each text's tokens.
  """

  def __init__(self, model: Any, params: Any, tokenizer: Any, *, max_tokens: int | None = None,
               batch_size: int = 16):
    limit = int(model.cfg.max_positions)
    self.max_tokens = min(int(max_tokens or 512), limit)
    if self.max_tokens < 2:
      raise ValueError(f'max_tokens must be >= 2, got {self.max_tokens}')
    self.model, self.params, self.tokenizer, self.batch_size = model, params, tokenizer, int(batch_size)
    self.buckets = length_buckets(self.max_tokens)
    self.dim = int(model.cfg.hidden_size)

    def pool(params, tokens_BT, segment_ids_BT):
      positions = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)
      _, aux = model.apply({'params': params}, tokens_BT, positions, segment_ids_BT)
      hidden_BTD = aux['hidden'].astype(jnp.float32)
      mask_BT1 = (segment_ids_BT > 0).astype(jnp.float32)[..., None]
      mean_BD = (hidden_BTD * mask_BT1).sum(1) / jnp.maximum(mask_BT1.sum(1), 1.0)
      return mean_BD / jnp.maximum(jnp.linalg.norm(mean_BD, axis=-1, keepdims=True), 1e-12)

    self._pool = jax.jit(pool)

  def token_ids(self, text: str) -> list[int]:
    """[bos] + the tokens of `text`, cut to `max_tokens`."""
    return ([int(self.tokenizer.bos_id)] + [int(t) for t in self.tokenizer.encode(text)])[:self.max_tokens]

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    ids = [self.token_ids(t) for t in texts]
    out = np.zeros((len(ids), self.dim), np.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a padded width
    for begin in range(0, len(order), self.batch_size):
      rows = order[begin:begin + self.batch_size]
      width = next(b for b in self.buckets if b >= max(len(ids[i]) for i in rows))
      batch = 1 if len(rows) == 1 else self.batch_size
      tokens = np.full((batch, width), int(self.tokenizer.pad_id), np.int32)
      segments = np.zeros((batch, width), np.int32)
      for r, i in enumerate(rows):
        tokens[r, :len(ids[i])] = ids[i]
        segments[r, :len(ids[i])] = 1
      vectors = np.asarray(self._pool(self.params, tokens, segments), np.float32)
      out[rows] = vectors[:len(rows)]
    return out


def model_info(model_cfg: Any, tokenizer: Any, checkpoint: str | None = None) -> dict[str, Any]:
  """What the manifest records about the embedding model: checkpoint, `model` config, tokenizer."""
  config = model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else dict(model_cfg)
  return dict(checkpoint=checkpoint, config=json.loads(json.dumps(config, default=str)),
              tokenizer=getattr(tokenizer, 'path', None) or repr(tokenizer), vocab_size=int(tokenizer.vocab_size))


# Config fields that change the numbers only slightly (compute precision); the probe vector checks those.
_PRECISION_FIELDS = ('dtype', 'remat')


def check_model_info(stored: dict[str, Any], current: dict[str, Any], where: str) -> None:
  """Raises ValueError when the model that embeds queries is not the one that built the index at `where`."""
  def arch(info):
    return {k: v for k, v in (info.get('config') or {}).items() if k not in _PRECISION_FIELDS}
  built_by = stored.get('checkpoint') or 'an in-memory model'
  if arch(stored) != arch(current):
    diff = sorted(k for k in set(arch(stored)) | set(arch(current)) if arch(stored).get(k) != arch(current).get(k))
    raise ValueError(f'the dense index at {where!r} was built with a different model ({built_by}; config fields '
                     f'differ: {", ".join(diff)}); rebuild it with this checkpoint')
  if stored.get('vocab_size') != current.get('vocab_size'):
    raise ValueError(f'the dense index at {where!r} was built with a different tokenizer ({stored.get("tokenizer")}, '
                     f'vocab {stored.get("vocab_size")}; now {current.get("tokenizer")}, vocab '
                     f'{current.get("vocab_size")}); rebuild it with this checkpoint')


class DenseIndex:
  """Exact inner-product search (faiss IndexFlatIP) over unit vectors = cosine similarity."""

  def __init__(self, index: faiss.Index):
    self.index = index

  @classmethod
  def build(cls, vectors: np.ndarray) -> DenseIndex:
    vectors = np.ascontiguousarray(vectors, np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return cls(index)

  @property
  def size(self) -> int:
    return int(self.index.ntotal)

  @property
  def dim(self) -> int:
    return int(self.index.d)

  def search(self, query_vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices int64 [k'], cosine scores float32 [k']) of the best k' = min(k, size) vectors, best first."""
    k = min(int(k), self.size)
    if k < 1:
      return np.zeros(0, np.int64), np.zeros(0, np.float32)
    scores, indices = self.index.search(np.ascontiguousarray(query_vector, np.float32).reshape(1, -1), k)
    keep = indices[0] >= 0
    return indices[0][keep].astype(np.int64), scores[0][keep].astype(np.float32)

  def save(self, path: str) -> None:
    faiss.write_index(self.index, path)

  @classmethod
  def load(cls, path: str, size: int, dim: int) -> DenseIndex:
    """Raises ValueError naming `path` when it is not a faiss index of `size` vectors of `dim`."""
    try:
      index = faiss.read_index(path)
    except RuntimeError as e:
      raise ValueError(f'corrupt faiss index at {path!r}: {str(e).splitlines()[0] if str(e) else e}') from None
    if int(index.ntotal) != size or int(index.d) != dim:
      raise ValueError(f'corrupt faiss index at {path!r}: {index.ntotal} vectors of dimension {index.d}, the '
                       f'manifest says {size} of {dim}')
    return cls(index)
