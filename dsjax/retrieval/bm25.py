"""Lexical retrieval: Okapi BM25 through the `bm25s` library, over a code-aware tokenization.

Scoring is bm25s's default 'lucene' variant (Kamphuis et al., ECIR 2020): for a query with tokens q (repeats
counted), score(d) = sum_q idf(q) * tf / (tf + k1 * (1 - b + b * |d| / avgdl)), with
idf(q) = ln(1 + (N - df + 0.5) / (df + 0.5)) (never negative), k1 = 1.5, b = 0.75.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import bm25s
import numpy as np

_IDENTIFIER = re.compile(r'[A-Za-z0-9_]+')
# camelCase / PascalCase / acronym / digit runs: 'parseHTTPResponse2' -> parse, HTTP, Response, 2.
_CAMEL_PART = re.compile(r'[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+')
TOKENIZER_NAME = 'code-identifiers-v1'  # stored in the manifest: an index is only searched with its tokenizer


def code_tokens(text: str) -> list[str]:
  """Lowercased search terms of source text: each identifier (runs of letters, digits and '_'; punctuation and
  whitespace separate them) with its outer underscores stripped, followed by its snake_case and camelCase parts
  when it has more than one.

  Why both: a query names things in pieces or in another naming style ('read config' vs `read_config` vs
  `readConfig`), which only the parts match, while a term for the whole identifier lets an exact name match score
  above documents that merely share its common parts ('get', 'name').
  """
  tokens = []
  for ident in _IDENTIFIER.findall(text):
    whole = ident.strip('_')
    if not whole:
      continue
    tokens.append(whole.lower())
    parts = [p.lower() for piece in whole.split('_') for p in _CAMEL_PART.findall(piece)]
    if len(parts) > 1:
      tokens += parts
  return tokens


class BM25Index:
  """A bm25s index over texts tokenized with `code_tokens`; `scores(query)` -> float32 [num_docs]."""

  def __init__(self, retriever: bm25s.BM25, num_docs: int):
    self.retriever, self.num_docs = retriever, num_docs

  @classmethod
  def build(cls, texts: Sequence[str], *, k1: float = 1.5, b: float = 0.75) -> BM25Index:
    if not texts:
      raise ValueError('cannot build a BM25 index over no texts')
    retriever = bm25s.BM25(k1=k1, b=b, method='lucene')
    retriever.index([code_tokens(t) for t in texts], show_progress=False)
    return cls(retriever, len(texts))

  @property
  def params(self) -> dict[str, float | str]:
    return dict(k1=float(self.retriever.k1), b=float(self.retriever.b), method=self.retriever.method)

  def scores(self, query: str) -> np.ndarray:
    """BM25 score of every document for `query` (terms outside the vocabulary score nothing)."""
    vocab = self.retriever.vocab_dict
    tokens = [t for t in code_tokens(query) if t in vocab]
    if not tokens:
      return np.zeros(self.num_docs, np.float32)
    return np.asarray(self.retriever.get_scores(tokens), np.float32)

  def save(self, directory: str) -> None:
    self.retriever.save(directory, show_progress=False)

  @classmethod
  def load(cls, directory: str, num_docs: int) -> BM25Index:
    """Raises ValueError naming `directory` when it does not hold a bm25s index of `num_docs` documents."""
    try:
      retriever = bm25s.BM25.load(directory, show_progress=False)
    except (OSError, ValueError, KeyError) as e:
      raise ValueError(f'corrupt BM25 index at {directory!r}: {type(e).__name__}: {e}') from None
    found = int(retriever.scores.get('num_docs', -1))
    if found != num_docs:
      raise ValueError(f'corrupt BM25 index at {directory!r}: {found} documents, the manifest says {num_docs}')
    return cls(retriever, num_docs)
