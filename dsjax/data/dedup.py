"""Exact and near-duplicate documents, found before the train/validation split so that no copy of a validation document
stays in train.

Exact: sha256 of the text with whitespace runs collapsed to one space (and stripped).
Near: MinHash + LSH from `datasketch` over shingles = word 5-grams, words being the `\\w+` runs of the text (the usual
choice for code near-dedup, as in BigCode's: robust to reformatting and punctuation edits, and about 5x fewer shingles
than character n-grams, so faster). LSH proposes candidates; a candidate counts only if the MinHash estimate of
Jaccard similarity is >= the threshold.

Which copy is kept: documents are visited in source order, and a document is kept iff it is not an exact copy of an
earlier one and no earlier *kept* document is its near-duplicate; dropped documents map to the earliest kept document
that they duplicate. So a chain A~B~C with A !~ C keeps A and C and drops B, whatever the order of LSH candidates.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import zlib
from collections.abc import Callable, Sequence

import numpy as np

DEDUP_MODES = ('none', 'exact', 'near')
_SEED = 1  # MinHash permutation seed: fixed, so results are reproducible across runs and machines
_CHUNK = 4096  # shingles per MinHash update: bounds the [chunk, num_perm] temporary
_WORD = re.compile(r'\w+')


@dataclasses.dataclass(frozen=True)
class DedupConfig:
  """`mode`: 'none', 'exact' or 'near' (near includes exact). `threshold`: the Jaccard similarity in (0, 1] at which
  two documents are near-duplicates. `num_perm`: MinHash permutations. `shingle`: words per shingle."""
  mode: str = 'near'
  threshold: float = 0.8
  num_perm: int = 128
  shingle: int = 5

  def __post_init__(self):
    if self.mode not in DEDUP_MODES:
      raise ValueError(f'dedup.mode must be one of {DEDUP_MODES}, got {self.mode!r}')
    if not 0.0 < self.threshold <= 1.0:
      raise ValueError(f'dedup.threshold must be in (0, 1], got {self.threshold}')
    if not isinstance(self.num_perm, int) or self.num_perm < 2:
      raise ValueError(f'dedup.num_perm must be an integer >= 2, got {self.num_perm!r}')
    if not isinstance(self.shingle, int) or self.shingle < 1:
      raise ValueError(f'dedup.shingle must be an integer >= 1, got {self.shingle!r}')


@dataclasses.dataclass
class DedupResult:
  """`keep`: the indices kept, ascending. `exact_duplicates` / `near_duplicates`: dropped index -> the kept index it
  duplicates."""
  keep: list[int]
  exact_duplicates: dict[int, int]
  near_duplicates: dict[int, int]


def normalize(text: str) -> str:
  """The text with every whitespace run collapsed to one space, stripped: what exact duplicates agree on."""
  return ' '.join(text.split())


def shingle_hashes(text: str, shingle: int, vocab: dict[str, int] | None = None) -> np.ndarray:
  """uint32 [num_shingles]: a hash of each run of `shingle` consecutive words (`\\w+`) of `text`; a text with fewer
  words is one shingle, a text without words none. `vocab` caches word -> crc32 across calls."""
  words = _WORD.findall(text)
  if not words:
    return np.zeros(0, np.uint32)
  if vocab is None:
    vocab = {}
  for w in set(words).difference(vocab):
    vocab[w] = zlib.crc32(w.encode('utf-8', errors='surrogatepass'))
  ids = np.fromiter(map(vocab.__getitem__, words), np.uint64, len(words))
  n = max(len(words) - shingle + 1, 1)
  k = min(shingle, len(words))
  # Polynomial hash of the k words (uint64 arithmetic wraps), folded to 32 bits.
  h = np.zeros(n, np.uint64)
  for j in range(k):
    h = h * np.uint64(0x100000001B3) + ids[j:j + n]
  return ((h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _identity(x):
  return x


def minhash(hashes: np.ndarray, num_perm: int, prototype=None):
  """The datasketch LeanMinHash of a set given by its uint32 element hashes (fixed seed). `prototype`: an empty
  MinHash with the same num_perm whose permutations are reused (saves drawing them again)."""
  from datasketch import LeanMinHash, MinHash  # pylint: disable=g-import-not-at-top  (near-duplicates only)

  if prototype is None:
    m = MinHash(num_perm=num_perm, seed=_SEED, hashfunc=_identity)
  else:
    m = MinHash(num_perm=num_perm, seed=_SEED, hashfunc=_identity, permutations=prototype.permutations,
                scheme=prototype.scheme)
  for start in range(0, len(hashes), _CHUNK):
    m.update_batch(hashes[start:start + _CHUNK].tolist())
  return LeanMinHash(m)


def _deduplicate(num: int, read_text: Callable[[int], str], config: DedupConfig) -> DedupResult:
  """`deduplicate` reading document i with `read_text(i)`, each once, in order."""
  if config.mode == 'none':
    return DedupResult(list(range(num)), {}, {})
  lsh = prototype = None
  if config.mode == 'near':
    from datasketch import MinHash, MinHashLSH  # pylint: disable=g-import-not-at-top  (near-duplicates only)
    lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
    prototype = MinHash(num_perm=config.num_perm, seed=_SEED)
  first_with_hash: dict[bytes, int] = {}
  keep: list[int] = []
  exact: dict[int, int] = {}
  near: dict[int, int] = {}
  vocab: dict[str, int] = {}
  lsh_minhashes = {}  # kept index -> its LeanMinHash
  for i in range(num):
    text = read_text(i)
    digest = hashlib.sha256(normalize(text).encode('utf-8', errors='surrogatepass')).digest()
    original = first_with_hash.setdefault(digest, i)
    if original != i:
      if original in near:  # same text as a near-duplicate: a near-duplicate of the same kept document
        near[i] = near[original]
      else:
        exact[i] = original
      continue
    if lsh is not None:
      hashes = shingle_hashes(text, config.shingle, vocab)
      if len(hashes):
        m = minhash(hashes, config.num_perm, prototype)
        # Only kept documents are in the index, so the candidates are earlier kept documents.
        matches = [j for j in lsh.query(m) if m.jaccard(lsh_minhashes[j]) >= config.threshold]
        if matches:
          near[i] = min(matches)
          continue
        lsh.insert(i, m, check_duplication=False)
        lsh_minhashes[i] = m
    keep.append(i)
  return DedupResult(keep, exact, near)


def deduplicate(texts: Sequence[str], config: DedupConfig) -> DedupResult:
  """Which of `texts` to keep: see the module docstring. Deterministic (fixed MinHash seed)."""
  return _deduplicate(len(texts), texts.__getitem__, config)
