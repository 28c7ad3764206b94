"""What the pipeline reads: the sources of `data.mixture` (or `data.source` alone), cleaned, split, weighted.

  every source listed (corpus.list_documents), in mixture order
    -> one preparation pass over all of them (cached on disk by the sources' fingerprint):
       scrubbing counts (dsjax/data/scrub.py, `data.scrub`) and exact / MinHash near-duplicate removal
       (dsjax/data/dedup.py, `data.dedup`) across sources, BEFORE the split, so no copy of a validation document
       stays in train and replayed data that also appears in the new data is read once
    -> each source's train or validation split (corpus.split_documents)
    -> components: one per source, or with `data.balance_by` one per (source, class), weighted
    -> a grain mixture of the components' shuffled, repeated documents (MapDataset.mix), each tagged with its
       component index so batches carry per-token `source_ids` and the trainer logs the realised proportions.

Weights are shares of tokens by default (`data.mixture_unit='tokens'`): grain mixes documents, so each component's
document rate is its token share divided by its mean document size in bytes (bytes stand in for tokens: the ratio
of bytes to tokens is about the same for every source of one tokenizer). With 'documents' the weights are shares of
documents. Class balancing (`data.balance_by`) splits a source's weight over its classes in proportion to
class_size ** data.balance_alpha: 0 gives every class the same share, 1 the natural proportions (temperature
sampling as in multilingual pretraining, e.g. XLM-R's alpha = 0.3).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from dsjax.data import corpus
from dsjax.data import dedup
from dsjax.data import scrub

MIXTURE_KEYS = ('source', 'weight', 'jsonl_field', 'include_stdlib_tests')
UNITS = ('tokens', 'documents')


class SourceSpec(NamedTuple):
  """One entry of the mixture: where its documents are and its (unnormalised) weight."""
  name: str
  source: str
  weight: float
  jsonl_field: str
  include_stdlib_tests: bool


@dataclasses.dataclass(frozen=True)
class Component:
  """Documents sampled as one part of the mixture; `weight` is its normalised share (in `data.mixture_unit`)."""
  name: str
  docs: corpus.DocumentSource
  weight: float


def source_specs(data_cfg: Any) -> list[SourceSpec]:
  """The mixture entries of `data_cfg`: `data.mixture` ({name: {source, weight[, jsonl_field,
  include_stdlib_tests]}}) or, when it is empty, `data.source` alone. Raises ValueError naming a bad entry."""
  mixture = data_cfg.get('mixture') or {}
  if not mixture:
    return [SourceSpec('data', data_cfg.source, 1.0, data_cfg.jsonl_field, bool(data_cfg.include_stdlib_tests))]
  specs = []
  for name, entry in mixture.items():
    entry = entry.to_dict() if hasattr(entry, 'to_dict') else dict(entry)
    unknown = set(entry) - set(MIXTURE_KEYS)
    if unknown:
      raise ValueError(f'data.mixture.{name}: unknown key(s) {", ".join(sorted(unknown))} (allowed: '
                       f'{", ".join(MIXTURE_KEYS)})')
    if not isinstance(entry.get('source'), str) or not entry['source']:
      raise ValueError(f'data.mixture.{name}.source: required (stdlib, a directory or a file)')
    weight = entry.get('weight', 1.0)
    if not isinstance(weight, (int, float)) or not weight > 0:
      raise ValueError(f'data.mixture.{name}.weight={weight!r}: must be a positive number')
    specs.append(SourceSpec(name, entry['source'], float(weight), entry.get('jsonl_field', data_cfg.jsonl_field),
                            bool(entry.get('include_stdlib_tests', data_cfg.include_stdlib_tests))))
  return specs


def scrub_config(data_cfg: Any):
  """The scrub.ScrubConfig of `data.scrub` ('' off, 'all', or comma-separated categories), or None when off."""
  spec = str(data_cfg.get('scrub', '') or '').strip()
  if not spec:
    return None
  categories = scrub.CATEGORIES if spec == 'all' else tuple(c.strip() for c in spec.split(',') if c.strip())
  try:
    return scrub.ScrubConfig(categories=categories, mode=data_cfg.get('scrub_mode', 'mask'))
  except ValueError as e:
    raise ValueError(f'data.scrub={spec!r}: {e}') from None


def _dedup_config(data_cfg: Any):
  return dedup.DedupConfig(mode=data_cfg.get('dedup', 'none'), threshold=float(data_cfg.get('dedup_threshold', 0.8)))


def cache_dir(data_cfg: Any) -> str:
  """`data.cache_dir`, else $XDG_CACHE_HOME/dsjax (default ~/.cache/dsjax)."""
  return data_cfg.get('cache_dir') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'dsjax')


def _prepare_pass(docs: corpus.DocumentSource, data_cfg: Any) -> dict[str, Any]:
  """Reads every document once: scrub counts per category, documents dropped by scrubbing, duplicates."""
  scrub_cfg = scrub_config(data_cfg)
  scrubber = None
  if scrub_cfg is not None:
    scrubber = scrub.Scrubber(scrub_cfg)
  counts: Counter[str] = Counter()
  texts, indices, touched = [], [], 0
  for i in range(len(docs)):
    text = docs[i].text
    if scrubber is not None:
      text, found = scrubber.scrub(text)
      counts.update(found)
      touched += bool(found)
      if text is None:  # drop_document mode
        continue
    texts.append(text)
    indices.append(i)
  result = dedup.deduplicate(texts, _dedup_config(data_cfg))
  return dict(keep=[indices[j] for j in result.keep], documents=len(docs),
              exact_duplicates=len(result.exact_duplicates), near_duplicates=len(result.near_duplicates),
              scrub_counts=dict(sorted(counts.items())), scrubbed_documents=touched,
              dropped_by_scrub=len(docs) - len(indices))


def prepare(data_cfg: Any) -> tuple[list[tuple[SourceSpec, corpus.DocumentSource]], dict[str, Any]]:
  """Every mixture source's documents after scrubbing and deduplication (before the split), and a report: document
  counts, duplicates removed, scrub findings per category.

  The pass reads every document once; its result is cached as JSON in `cache_dir(data_cfg)` under a hash of the
  sources' fingerprint and the dedup/scrub settings (written atomically), so later runs and the validation split
  only list the sources.
  """
  specs = source_specs(data_cfg)
  sources = [corpus.list_documents(s.source, include_stdlib_tests=s.include_stdlib_tests, jsonl_field=s.jsonl_field)
             for s in specs]
  everything = corpus.DocumentSource.concatenate(sources, 'mixture')
  offsets = np.cumsum([0] + [len(s) for s in sources])
  dedup_mode = data_cfg.get('dedup', 'none')
  scrub_cfg = scrub_config(data_cfg)
  if dedup_mode == 'none' and scrub_cfg is None:
    report = dict(keep=list(range(len(everything))), documents=len(everything), exact_duplicates=0,
                  near_duplicates=0, scrub_counts={}, scrubbed_documents=0, dropped_by_scrub=0)
  else:
    _dedup_config(data_cfg)  # a bad dedup setting fails before the pass
    settings = dict(dedup=dedup_mode, threshold=float(data_cfg.get('dedup_threshold', 0.8)),
                    scrub=dataclasses.asdict(scrub_cfg) if scrub_cfg else None, version=1)
    key = hashlib.sha256((everything.fingerprint() + json.dumps(settings, sort_keys=True)).encode()).hexdigest()
    path = os.path.join(cache_dir(data_cfg), 'prepared', f'{key[:32]}.json')
    report = _read_json(path)
    if report is None:
      report = _prepare_pass(everything, data_cfg)
      _write_json_atomic(path, report)
  keep = np.zeros(len(everything), bool)
  keep[report['keep']] = True
  prepared = [(spec, src.select(np.flatnonzero(keep[offsets[k]:offsets[k + 1]]).tolist(), src.description))
              for k, (spec, src) in enumerate(zip(specs, sources))]
  summary = {k: v for k, v in report.items() if k != 'keep'}
  summary['kept'] = len(report['keep'])
  return prepared, summary


def _read_json(path: str) -> dict[str, Any] | None:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None  # absent or unreadable: recompute


def _write_json_atomic(path: str, value: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(value, f)
  os.replace(tmp, path)


def components(data_cfg: Any, split: str) -> list[Component]:
  """The mixture's components for `split`, weights normalised to sum to 1 (see the module docstring).

  A source without validation documents is left out of a mixture's validation split. Raises ValueError when a
  source's train split (or every validation split) is empty, or `data.balance_by` names a field a document lacks.
  """
  prepared, _ = prepare(data_cfg)
  balance_by = data_cfg.get('balance_by', '') or ''
  alpha = float(data_cfg.get('balance_alpha', 0.0))
  found: list[Component] = []
  for spec, docs in prepared:
    try:
      docs = corpus.split_documents(docs, split, data_cfg.validation_fraction)
    except ValueError:
      if split == 'train' or len(prepared) == 1:
        raise
      continue  # a small source may have no held-out document; the others' validation documents remain
    if not balance_by:
      found.append(Component(spec.name, docs, spec.weight))
      continue
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(docs.labels(balance_by)):
      by_class.setdefault(label, []).append(i)
    sizes = {label: len(ix) ** alpha for label, ix in by_class.items()}
    total = sum(sizes.values())
    for label in sorted(by_class):
      found.append(Component(f'{spec.name}/{label or "(none)"}', docs.select(by_class[label], f'{docs.description}, '
                                                                             f'{balance_by}={label!r}'),
                             spec.weight * sizes[label] / total))
  if not found:
    raise ValueError(f'no source of the mixture has documents in the {split!r} split (raise '
                     'data.validation_fraction)')
  total = sum(c.weight for c in found)
  return [dataclasses.replace(c, weight=c.weight / total) for c in found]


def document_rates(comps: Sequence[Component], unit: str) -> list[float]:
  """The share of documents to draw from each component so that `unit` ('tokens' or 'documents') follows the
  weights: with 'tokens', weight / mean document bytes, normalised."""
  if unit not in UNITS:
    raise ValueError(f'data.mixture_unit={unit!r}: must be one of {", ".join(UNITS)}')
  if unit == 'documents':
    rates = [c.weight for c in comps]
  else:
    rates = [c.weight / max(float(np.mean(c.docs.sizes)), 1.0) for c in comps]
  total = sum(rates)
  return [r / total for r in rates]


class _Tag:
  """Document -> (component index, document)."""

  def __init__(self, index: int):
    self._index = index

  def __call__(self, doc: corpus.Document) -> tuple[int, corpus.Document]:
    return self._index, doc


def mixed_documents(comps: Sequence[Component], *, unit: str, seed: int, shuffle: bool, repeat: bool,
                    shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
  """(component index, Document) pairs in reading order for one data shard.

  Each component is sharded (`[shard_index::shard_count]`), shuffled with its own seed and repeated before mixing,
  as grain's MapDataset.mix asks, so the mixture is endless and its proportions hold in every window. grain's mix
  picks components deterministically in proportion to the rates (no sampling noise). Without `repeat` the mixture
  ends when its first component runs out.
  """
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f'need 0 <= shard_index < shard_count, got shard_index={shard_index}, shard_count={shard_count}')
  parts = []
  for k, comp in enumerate(comps):
    ds = grain.MapDataset.source(comp.docs)[shard_index::shard_count]
    if len(ds) == 0:
      raise ValueError(f'shard {shard_index} of {shard_count} of {comp.docs!r} has no documents (fewer documents '
                       'than data shards)')
    if shuffle:
      ds = ds.shuffle(seed=(seed + 7919 * k) % 2**32)
    if repeat:
      ds = ds.repeat()
    parts.append(ds.map(_Tag(k)))
  if len(parts) == 1:
    return parts[0]
  return grain.MapDataset.mix(parts, document_rates(comps, unit))


def format_report(comps: Sequence[Component], summary: dict[str, Any], unit: str) -> str:
  """A few lines for the training log: the preparation summary and each component's documents and weight."""
  lines = [f'data: {summary["kept"]:,} of {summary["documents"]:,} documents kept ({summary["exact_duplicates"]} '
           f'exact and {summary["near_duplicates"]} near duplicates, {summary["dropped_by_scrub"]} dropped by '
           'scrubbing)']
  if summary['scrub_counts'] or summary['scrubbed_documents']:
    found = ', '.join(f'{k} {v}' for k, v in summary['scrub_counts'].items()) or 'nothing'
    lines.append(f'data: scrubbed {summary["scrubbed_documents"]} documents: {found}')
  if len(comps) > 1:
    lines += [f'data: mixture component {c.name}: {len(c.docs):,} train documents, {c.weight:.3f} of {unit}'
              for c in comps]
  return '\n'.join(lines)


class RealisedShares:
  """Counts the tokens each component contributed to this process's batches (from their `source_ids`), for logging
  the realised mixture next to the configured weights."""

  def __init__(self, names: Sequence[str]):
    self.names = list(names)
    self.counts = np.zeros(len(self.names), np.int64)

  def update(self, source_ids: np.ndarray, segment_ids: np.ndarray) -> None:
    """Adds one batch: source_ids, segment_ids [B, T] (tokens with segment 0 are padding)."""
    self.counts += np.bincount(source_ids[segment_ids > 0].ravel(), minlength=len(self.names))[:len(self.names)]

  def shares(self) -> dict[str, float]:
    """{name: share of the tokens counted so far}."""
    total = max(int(self.counts.sum()), 1)
    return {name: float(c) / total for name, c in zip(self.names, self.counts)}


def load_split(data_cfg: Any, split: str) -> corpus.DocumentSource:
  """The `split` documents of every source of `data_cfg` (its `mixture`, or `source` alone), after deduplication and
  scrubbing drops, one source after the other (unweighted: for evaluation and counting; training samples the
  mixture, see `components`)."""
  comps = components(data_cfg, split)
  if len(comps) == 1:
    return comps[0].docs
  return corpus.DocumentSource.concatenate([c.docs for c in comps], f'{split} split of the mixture '
                                           f'{", ".join(c.name for c in comps)}')
