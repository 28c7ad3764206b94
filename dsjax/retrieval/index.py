"""`RetrievalIndex`: snippets with a BM25 part, a dense part, or both ('hybrid'), saved as one directory.

Layout of a saved index:
  manifest.json   format, kind ('bm25' | 'dense' | 'hybrid'), count, source, and per part its settings; the dense
                  part also records the embedding model (checkpoint, `model` config, tokenizer) and the vector of a
                  fixed probe text, so loading with another model fails instead of returning nonsense
  snippets.jsonl  one {"name", "text"} per line, in index order
  bm25/           the bm25s index (bm25s's own save format)
  dense.faiss     the faiss IndexFlatIP (faiss.write_index)

Hybrid search fuses the two rankings by reciprocal rank fusion (Cormack et al., SIGIR 2009): each snippet scores
sum over rankings of 1 / (RRF_K + rank), rank 1-based, over each ranking's top max(k, RRF_CANDIDATES); RRF needs no
calibration between BM25 scores and cosines.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from dsjax.retrieval import bm25 as bm25_lib
from dsjax.retrieval import dense as dense_lib
from dsjax.retrieval import snippets as snippets_lib
from dsjax.retrieval.snippets import Snippet
from dsjax.data import corpus
from dsjax.data import mixture

FORMAT_VERSION = 1
KINDS = ('bm25', 'dense', 'hybrid')
RRF_K = 60
RRF_CANDIDATES = 50
MANIFEST = 'manifest.json'
SNIPPETS = 'snippets.jsonl'
BM25_DIR = 'bm25'
DENSE_FILE = 'dense.faiss'

EmbedFn = Callable[[Sequence[str]], np.ndarray]  # texts -> float32 [N, D] unit vectors


class Hit(NamedTuple):
  """One search result: the snippet's `name` and `text`, and its `score` (BM25, cosine, or fused RRF)."""
  name: str
  text: str
  score: float


def _uses(kind: str, part: str) -> bool:
  return kind == part or kind == 'hybrid'


class RetrievalIndex:
  """Snippets plus the parts `kind` needs; `search(query, k)` -> the best k `Hit`s, best first.

  Dense and hybrid indexes embed queries with `embedder` (a `dense.Embedder` of the model that built the index, or
  any function texts -> unit vectors [N, D]).
  """

  def __init__(self, snippets: Sequence[Snippet], manifest: dict[str, Any], *,
               bm25: bm25_lib.BM25Index | None = None, dense: dense_lib.DenseIndex | None = None,
               embedder: EmbedFn | None = None):
    self.snippets, self.manifest = list(snippets), manifest
    self.kind = manifest['kind']
    self.bm25, self.dense, self.embedder = bm25, dense, embedder

  def __len__(self) -> int:
    return len(self.snippets)

  def __repr__(self) -> str:
    return f'RetrievalIndex({self.kind}, {len(self)} snippets, source {self.manifest.get("source")!r})'

  @classmethod
  def build(cls, snippets: Sequence[Snippet], kind: str = 'bm25', *, embedder: EmbedFn | None = None,
            source: Any = '', model_info: dict[str, Any] | None = None, k1: float = 1.5, b: float = 0.75,
            settings: dict[str, Any] | None = None) -> RetrievalIndex:
    """Indexes `snippets`. Dense/hybrid need `embedder`; `model_info` (`dense.model_info`) is recorded in the
    manifest (default: taken from an `Embedder`). `source` and `settings` are recorded as given."""
    if kind not in KINDS:
      raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
    if not snippets:
      raise ValueError('no snippets to index (is the source empty?)')
    manifest: dict[str, Any] = dict(format=FORMAT_VERSION, kind=kind, count=len(snippets), source=source,
                                    settings=settings or {})
    bm25 = dense = None
    texts = [s.text for s in snippets]
    if _uses(kind, 'bm25'):
      bm25 = bm25_lib.BM25Index.build(texts, k1=k1, b=b)
      manifest['bm25'] = dict(tokenizer=bm25_lib.TOKENIZER_NAME, **bm25.params)
    if _uses(kind, 'dense'):
      if embedder is None:
        raise ValueError(f'a {kind} index needs the model to embed snippets (embedder=...)')
      vectors = np.asarray(embedder(texts), np.float32)
      dense = dense_lib.DenseIndex.build(vectors)
      if model_info is None and isinstance(embedder, dense_lib.Embedder):
        model_info = dense_lib.model_info(embedder.model.cfg, embedder.tokenizer)
      manifest['dense'] = dict(dim=dense.dim, max_tokens=getattr(embedder, 'max_tokens', None), model=model_info,
                               probe=[float(x) for x in np.asarray(embedder([dense_lib.PROBE_TEXT]))[0]])
    return cls(snippets, manifest, bm25=bm25, dense=dense, embedder=embedder)

  # ---- search

  def _bm25_ranking(self, query: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top n snippets sharing a term with the query (ties: index order), with their scores."""
    scores = self.bm25.scores(query)
    order = np.argsort(-scores, kind='stable')[:n]
    order = order[scores[order] > 0]
    return order, scores[order]

  def _dense_ranking(self, query: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    vector = np.asarray(self.embedder([query]), np.float32)[0]
    return self.dense.search(vector, n)

  def search(self, query: str, k: int) -> list[Hit]:
    """The best `k` snippets for `query`, best first (fewer when the index is smaller or, for BM25, when fewer
    snippets share a term with the query)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f'k must be a positive integer, got {k!r}')
    if self.kind == 'bm25':
      order, scores = self._bm25_ranking(query, k)
    elif self.kind == 'dense':
      order, scores = self._dense_ranking(query, k)
    else:
      n = max(k, RRF_CANDIDATES)
      fused: dict[int, float] = {}
      for ranking, _ in (self._bm25_ranking(query, n), self._dense_ranking(query, n)):
        for rank, i in enumerate(ranking.tolist(), 1):
          fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank)
      best = sorted(fused, key=lambda i: (-fused[i], i))[:k]
      order, scores = np.asarray(best, np.int64), np.asarray([fused[i] for i in best], np.float32)
    return [Hit(self.snippets[i].name, self.snippets[i].text, float(s)) for i, s in zip(order.tolist(), scores)]

  # ---- save / load

  def save(self, directory: str) -> None:
    """Writes the index to `directory` atomically: into a temporary sibling directory, then renamed into place
    (an existing index there is replaced; any other existing non-empty directory is refused)."""
    directory = os.path.abspath(directory)
    if os.path.isdir(directory) and os.listdir(directory) and not os.path.exists(os.path.join(directory, MANIFEST)):
      raise ValueError(f'{directory!r} exists and is not a retrieval index; refusing to overwrite it')
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(directory)}.tmp-', dir=parent)
    try:
      os.chmod(tmp, 0o755)
      with open(os.path.join(tmp, SNIPPETS), 'w', encoding='utf-8') as f:
        for s in self.snippets:
          f.write(json.dumps(dict(name=s.name, text=s.text), ensure_ascii=False) + '\n')
      if self.bm25 is not None:
        self.bm25.save(os.path.join(tmp, BM25_DIR))
      if self.dense is not None:
        self.dense.save(os.path.join(tmp, DENSE_FILE))
      with open(os.path.join(tmp, MANIFEST), 'w', encoding='utf-8') as f:
        json.dump(self.manifest, f, indent=2)
      old = None
      if os.path.exists(directory):
        old = tempfile.mkdtemp(prefix=f'.{os.path.basename(directory)}.old-', dir=parent)
        os.rename(directory, os.path.join(old, 'index'))
      os.rename(tmp, directory)
      if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise

  @classmethod
  def load(cls, directory: str, *, model: Any = None, params: Any = None, tokenizer: Any = None,
           embedder: EmbedFn | None = None) -> RetrievalIndex:
    """Loads an index saved by `save`. Dense/hybrid indexes need the model that built them: `model`, `params` and
    `tokenizer` (an `Embedder` is made with the manifest's max_tokens) or an `embedder`; the model's config and a
    probe text's vector must match the manifest's.

    Raises FileNotFoundError (no such directory, not an index) or ValueError (corrupt, or the wrong model), each
    naming the path.
    """
    if not os.path.isdir(directory):
      raise FileNotFoundError(f'retrieval index {directory!r} not found (no such directory)')
    manifest_path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(manifest_path):
      raise FileNotFoundError(f'{directory!r} is not a retrieval index: it has no {MANIFEST} (build one with '
                              '`python -m dsjax.retrieval build`)')
    manifest = _read_manifest(manifest_path)
    kind, count = manifest['kind'], manifest['count']
    snippets = _read_snippets(os.path.join(directory, SNIPPETS), count)
    bm25 = dense = None
    if _uses(kind, 'bm25'):
      bm25 = bm25_lib.BM25Index.load(os.path.join(directory, BM25_DIR), count)
    if _uses(kind, 'dense'):
      info = manifest.get('dense')
      if not isinstance(info, dict) or not isinstance(info.get('dim'), int) or not isinstance(info.get('probe'), list):
        raise ValueError(f'corrupt retrieval index manifest {manifest_path!r}: no valid "dense" section')
      path = os.path.join(directory, DENSE_FILE)
      if not os.path.isfile(path):
        raise ValueError(f'corrupt retrieval index {directory!r}: {DENSE_FILE} is missing')
      dense = dense_lib.DenseIndex.load(path, count, info['dim'])
      if embedder is None:
        if model is None or params is None or tokenizer is None:
          raise ValueError(f'the {kind} index at {directory!r} embeds queries with the model that built it '
                           f'({(info.get("model") or {}).get("checkpoint") or "unknown checkpoint"}): pass '
                           'model, params and tokenizer (CLI: --checkpoint)')
        embedder = dense_lib.Embedder(model, params, tokenizer, max_tokens=info.get('max_tokens'))
      _check_embedder(embedder, info, directory)
    return cls(snippets, manifest, bm25=bm25, dense=dense, embedder=embedder)


load_index = RetrievalIndex.load


def build_from_source(data_cfg: Any, split: str, kind: str = 'bm25', *, embedder: EmbedFn | None = None,
                      model_info: dict[str, Any] | None = None, max_chars: int = snippets_lib.DEFAULT_MAX_CHARS,
                      window_lines: int = snippets_lib.DEFAULT_WINDOW_LINES,
                      max_snippets: int | None = None) -> RetrievalIndex:
  """The index of the snippets of `split` ('train', 'validation' or 'all') of the source that `data_cfg`
  (source, include_stdlib_tests, jsonl_field, validation_fraction, dedup) names. Duplicates are dropped before
  the split, as training does, and the manifest records the source and split, so evaluation can refuse an index
  that holds its held-out documents (evaluate.check_no_leakage)."""
  if split not in ('train', 'validation', 'all'):
    raise ValueError(f"split must be 'train', 'validation' or 'all', got {split!r}")
  if split == 'all':
    prepared = [docs for _, docs in mixture.prepare(data_cfg)[0]]
    docs = prepared[0] if len(prepared) == 1 else corpus.DocumentSource.concatenate(prepared, 'the mixture')
  else:
    docs = mixture.load_split(data_cfg, split)
  found = snippets_lib.corpus_snippets(docs, max_chars=max_chars, window_lines=window_lines,
                                       max_snippets=max_snippets)
  source = dict(source=data_cfg.source, split=split, validation_fraction=data_cfg.validation_fraction,
                include_stdlib_tests=bool(data_cfg.get('include_stdlib_tests', False)),
                dedup=data_cfg.get('dedup', 'none'), description=docs.description, documents=len(docs))
  settings = dict(max_chars=max_chars, window_lines=window_lines, max_snippets=max_snippets or 0)
  return RetrievalIndex.build(found, kind, embedder=embedder, source=source, model_info=model_info,
                              settings=settings)


def _read_manifest(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding='utf-8') as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'corrupt retrieval index manifest {path!r}: not valid JSON ({e})') from None
  if not isinstance(manifest, dict):
    raise ValueError(f'corrupt retrieval index manifest {path!r}: not a JSON object')
  if manifest.get('format') != FORMAT_VERSION:
    raise ValueError(f'retrieval index manifest {path!r} has format {manifest.get("format")!r}; this code reads '
                     f'format {FORMAT_VERSION} (rebuild the index)')
  if manifest.get('kind') not in KINDS:
    raise ValueError(f'corrupt retrieval index manifest {path!r}: kind {manifest.get("kind")!r} is not one of {KINDS}')
  count = manifest.get('count')
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise ValueError(f'corrupt retrieval index manifest {path!r}: count {count!r} is not a positive integer')
  if _uses(manifest['kind'], 'bm25'):
    tokenizer = (manifest.get('bm25') or {}).get('tokenizer')
    if tokenizer != bm25_lib.TOKENIZER_NAME:
      raise ValueError(f'retrieval index manifest {path!r}: BM25 tokenizer {tokenizer!r}, this code tokenizes as '
                       f'{bm25_lib.TOKENIZER_NAME!r} (rebuild the index)')
  return manifest


def _read_snippets(path: str, count: int) -> list[Snippet]:
  if not os.path.isfile(path):
    raise ValueError(f'corrupt retrieval index: {path!r} is missing')
  snippets = []
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      try:
        record = json.loads(line)
        snippets.append(Snippet(str(record['name']), str(record['text'])))
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f'corrupt retrieval index: {path!r} line {lineno} is not a {{"name", "text"}} record '
                         f'({type(e).__name__}: {e})') from None
  if len(snippets) != count:
    raise ValueError(f'corrupt retrieval index: {path!r} holds {len(snippets)} snippets, the manifest says {count}')
  return snippets


def _check_embedder(embedder: EmbedFn, info: dict[str, Any], directory: str) -> None:
  """The model config (for an `Embedder`) and then the probe vector must match what built the index."""
  if isinstance(embedder, dense_lib.Embedder) and info.get('model'):
    dense_lib.check_model_info(info['model'], dense_lib.model_info(embedder.model.cfg, embedder.tokenizer),
                               directory)
  probe = np.asarray(embedder([dense_lib.PROBE_TEXT]), np.float32)[0]
  stored = np.asarray(info['probe'], np.float32)
  if probe.shape != stored.shape:
    raise ValueError(f'the dense index at {directory!r} holds {stored.shape[0]}-dimensional vectors; this model '
                     f'embeds in {probe.shape[0]} dimensions; rebuild the index with this checkpoint')
  diff = float(np.abs(probe - stored).max())
  if diff > dense_lib.PROBE_TOLERANCE:
    built_by = (info.get('model') or {}).get('checkpoint') or 'another model'
    raise ValueError(f'the dense index at {directory!r} was built with {built_by}, whose embeddings differ from '
                     f'this model\'s (probe vector off by {diff:.3g} > {dense_lib.PROBE_TOLERANCE}: other weights, or '
                     'a different --quant/--adapter/--dtype); rebuild the index with the served model')
