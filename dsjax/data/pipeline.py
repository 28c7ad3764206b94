"""The grain input pipeline: documents -> shuffled, tokenized, packed, fixed-shape batches.

  the mixture's components for one split          dsjax/data/mixture.py: sources deduplicated and scrub-counted
                                                    before the split; class-balanced with data.balance_by
    -> this process's shard of each, by document   MapDataset slicing   [shard_index::shard_count]
    -> shuffled by document, reshuffled per epoch   MapDataset.shuffle(seed) then .repeat()
    -> mixed by weight, tagged with the component   MapDataset.mix (mixture.mixed_documents)
    -> scrubbed (data.scrub), [bos] + encode(text)  MapDataset.random_map, run on grain read threads
       (in fill-in-the-middle form for data.fim_rate of the training documents, dsjax/data/fim.py) + [eos],
       cut in pieces
    -> one element per piece                        grain.experimental.FlatMapIterDataset
    -> packed into rows of seq_len, rows shuffled   grain.experimental.FirstFitPackIterDataset
       within each packing group
    -> batches [batch_size, seq_len]                IterDataset.batch (the last partial batch padded with empty rows)
    -> background thread                            grain.experimental.ThreadPrefetchIterDataset

A batch is a dict of int32 numpy arrays, all [batch_size, seq_len]:
  inputs       token ids; targets  the next token of the same document (inputs shifted left by one within a segment);
  segment_ids  1, 2, ... numbers the document pieces within a row, 0 = padding (loss mask: segment_ids > 0);
  positions    position within the piece, restarting at 0 at each piece start;
  source_ids   the mixture component each token comes from (index into mixture.components; 0 in padding): the
               trainer logs the realised proportions from it and drops it before the step.
Padding cells hold tokenizer.pad_id in inputs/targets and 0 in segment_ids/positions.

Every stage is a grain dataset whose iterator state is exact, so `it = iter(ds); it.set_state(state)` on a fresh
iterator continues with exactly the batches that would have followed `state = it.get_state()`. The state is a small
JSON-serialisable dict (grain.checkpoint saves it next to an orbax checkpoint); restoring re-packs at most one packing
group (PACK_GROUP_TOKENS tokens, well under a second at seq_len >= 256). With repeat=True a packing group may hold the
end of one epoch and the start of the next.

Keep iterators in local variables (or close() and del them): grain's ThreadPrefetchDatasetIterator.close() is not
idempotent, so an iterator still referenced by a module global prints a harmless AttributeError at interpreter exit.
"""
from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import jax
import ml_collections
import numpy as np

from dsjax import config as config_lib
from dsjax.data import corpus
from dsjax.data import fim
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.data import mixture
from dsjax.data import scrub
from dsjax.data.tokenizer import Tokenizer

# Tokens per packing group: FirstFit fills ceil(PACK_GROUP_TOKENS / seq_len) rows at once (at least batch_size), then
# emits them in shuffled order. Larger groups waste less padding and mix more documents into a batch; restoring an
# iterator re-packs at most one group.
PACK_GROUP_TOKENS = 1 << 18
# Documents tokenized ahead by the read threads.
READ_PREFETCH_DOCS = 64
# Batches prepared ahead by the background thread.
PREFETCH_BATCHES = 2


def document_pieces(tokens: np.ndarray, seq_len: int, source_id: int = 0) -> list[np.ndarray]:
  """Next-token pairs of one document cut into pieces of at most `seq_len` pairs.

  `tokens` [n] is the whole document, [bos, ..., eos]. Its pairs are [n - 1, 3]: column 0 the inputs tokens[:-1],
  column 1 the targets tokens[1:], column 2 `source_id`; piece k holds pairs [k * seq_len, (k + 1) * seq_len). Each
  piece later becomes its own segment with positions from 0: the standard practice for fixed-length rows (a document
  longer than a row is continued in another row, and attention cannot reach across rows anyway). No text is thrown
  away: every token after bos is a target exactly once.
  """
  pairs = np.stack([tokens[:-1], tokens[1:], np.full(len(tokens) - 1, source_id, tokens.dtype)], axis=1)
  return [pairs[s:s + seq_len] for s in range(0, len(pairs), seq_len)]


class _TokenizeDocument:
  """(component index, corpus.Document), rng -> its pieces as packer elements {'pairs': [piece_len, 3]}. Runs on
  grain read threads; `rng` is grain's per-element generator (seeded by the element's index, so resumable)."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int, fim_rate: float = 0.0, fim_spm_rate: float = 0.5,
               scrub_config: Any = None):
    self._tokenizer = tokenizer
    self._seq_len = seq_len
    self._bos = np.asarray([tokenizer.bos_id], np.int32)
    self._eos = np.asarray([tokenizer.eos_id], np.int32)
    self._fim_rate = fim_rate
    self._fim_spm_rate = fim_spm_rate
    if fim_rate > 0 and getattr(tokenizer, 'fim_ids', None) is None:
      raise ValueError(f'data.fim_rate={fim_rate}: the tokenizer {tokenizer!r} has no fill-in-the-middle tokens '
                       f'(names: {tokenizer_lib.FIM_TOKEN_NAMES})')
    self._scrubber = None
    if scrub_config is not None:
      self._scrubber = scrub.Scrubber(scrub_config)

  def __call__(self, element: tuple[int, corpus.Document], rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    source_id, doc = element
    text = doc.text
    if self._scrubber is not None:
      text = self._scrubber.scrub(text)[0] or ''  # drop_document mode: mixture.prepare already dropped these
    ids = np.asarray(self._tokenizer.encode(text), dtype=np.int32)
    if self._fim_rate > 0 and rng.random() < self._fim_rate:
      ids = fim.permute(ids, self._tokenizer.fim_ids, rng, self._fim_spm_rate)
    tokens = np.concatenate([self._bos, ids, self._eos])
    return [{'pairs': piece} for piece in document_pieces(tokens, self._seq_len, source_id)]


class _Unlist(grain.experimental.FlatMapTransform):
  """A list of pieces -> the pieces, one element each."""
  max_fan_out = 1 << 20  # only read by FlatMapMapDataset; the IterDataset flat map has no fan-out limit

  def flat_map(self, element: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    return element


class _ToBatch:
  """Packed rows -> the batch dict, padding the last partial batch with empty rows.

  Hand-written because the packed feature is the [seq_len, 3] `pairs` (split here into inputs, targets and source
  ids), grain's
  packers name their outputs `<feature>_segment_ids` / `<feature>_positions` and pad with 0, and grain's
  batch_and_pad uses one pad value for all features.
  """

  def __init__(self, batch_size: int, pad_id: int):
    self._batch_size = batch_size
    self._pad_id = pad_id

  def __call__(self, rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    seg = np.zeros((self._batch_size, rows[0]['pairs'].shape[0]), np.int32)
    pos = np.zeros_like(seg)
    inputs = np.full_like(seg, self._pad_id)
    targets = np.full_like(seg, self._pad_id)
    sources = np.zeros_like(seg)
    for i, row in enumerate(rows):
      seg[i] = row['pairs_segment_ids']
      pos[i] = row['pairs_positions']
      inputs[i], targets[i], sources[i] = row['pairs'].T
    inputs[seg == 0] = self._pad_id
    targets[seg == 0] = self._pad_id
    sources[seg == 0] = 0
    return {'inputs': inputs, 'targets': targets, 'segment_ids': seg, 'positions': pos, 'source_ids': sources}


def make_dataset(data_cfg: Any, tokenizer: Tokenizer, *, split: str, batch_size: int, seed: int,
                 shard_index: int = 0, shard_count: int = 1, repeat: bool, shuffle: bool | None = None,
                 components: Sequence[mixture.Component] | None = None, seq_len: int | None = None,
                 fim_rate: float | None = None) -> grain.IterDataset:
  """The batches of `split` for one process, as a grain IterDataset (see the module docstring for the format).

  Args:
    data_cfg: `cfg.data` (sources: source or mixture, dedup/scrub/balance settings, validation_fraction, seq_len,
      fim_rate, fim_spm_rate, num_threads).
    tokenizer: a `Tokenizer`; each document becomes [bos] + encode(text) + [eos].
    split: 'train' or 'validation'.
    batch_size: rows per batch for this process (the global batch / shard_count).
    seed: document shuffle, fill-in-the-middle and packing-group shuffle seed (e.g. `cfg.data.shuffle_seed`).
    shard_index, shard_count: this process reads documents shard_index::shard_count of every component
      (jax.process_index() / jax.process_count()), so processes read disjoint documents.
    repeat: True: endless, each epoch in a new order. False: one pass (of the first component to run out), then
      StopIteration; the last partial batch is padded with empty rows (segment 0), so shapes stay fixed.
    shuffle: shuffle documents and rows; default True for 'train', False for 'validation' (a fixed order).
    components: the mixture components of `split` (default: `mixture.components(data_cfg, split)`).
    seq_len, fim_rate: override data.seq_len / data.fim_rate (a curriculum stage). Validation batches never use
      fill-in-the-middle, so held-out losses stay comparable across settings.

  Returns:
    IterDataset of {'inputs', 'targets', 'segment_ids', 'positions', 'source_ids'}: int32 [batch_size, seq_len].
    Its iterator is a grain DatasetIterator with exact get_state() / set_state().
  """
  seq_len = int(seq_len or data_cfg.seq_len)
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f'data.seq_len and batch_size must be positive, got seq_len={seq_len}, batch_size={batch_size}')
  if shuffle is None:
    shuffle = split == 'train'
  if fim_rate is None:
    fim_rate = float(data_cfg.get('fim_rate', 0.0))
  if split != 'train':
    fim_rate = 0.0
  if components is None:
    components = mixture.components(data_cfg, split)
  ds = mixture.mixed_documents(components, unit=data_cfg.get('mixture_unit', 'tokens'), seed=seed, shuffle=shuffle,
                               repeat=repeat, shard_index=shard_index, shard_count=shard_count)
  ds = ds.random_map(_TokenizeDocument(tokenizer, seq_len, fim_rate, float(data_cfg.get('fim_spm_rate', 0.5)),
                                       mixture.scrub_config(data_cfg)), seed=(seed + 1) % 2**32)
  num_threads = int(data_cfg.num_threads)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=READ_PREFETCH_DOCS if num_threads else 0))
  ds = grain.experimental.FlatMapIterDataset(ds, _Unlist())
  # FirstFit packing rather than ConcatThenSplit: a document's pieces depend on the document alone (cut at multiples
  # of seq_len from its start), so every document starting in a row starts there with bos at position 0, a document
  # shorter than a row is never split across two rows, the pieces are the same every epoch, and a test can compute
  # them independently. The price is a little padding at the end of some rows (small with large groups; see
  # PACK_GROUP_TOKENS), where ConcatThenSplit would leave none but would cut documents wherever a row ends.
  # Inputs, targets and source ids travel as one [len, 3] feature: grain's packer costs ~0.15 ms per element and
  # feature, so one feature packs faster than several.
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={'pairs': seq_len},
      num_packing_bins=max(batch_size, math.ceil(PACK_GROUP_TOKENS / seq_len)), seed=seed % 2**32,
      shuffle_bins=shuffle)
  ds = ds.batch(batch_size, batch_fn=_ToBatch(batch_size, tokenizer.pad_id))
  return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=PREFETCH_BATCHES)


def eval_batches(data_cfg: Any, tokenizer: Tokenizer, batch_size: int) -> list[dict[str, np.ndarray]]:
  """The first `data.eval_batches` batches of the held-out split: the same fixed set at every evaluation (every
  process loads them all and feeds its own rows). An empty split raises ValueError."""
  dataset = make_dataset(data_cfg, tokenizer, split='validation', batch_size=batch_size, seed=data_cfg.shuffle_seed,
                         repeat=False)
  batches = [{k: v for k, v in b.items() if k != 'source_ids'}
             for b in itertools.islice(iter(dataset), data_cfg.eval_batches)]
  if not batches:
    raise ValueError('the validation split produced no batch: lower train.batch_size or data.seq_len, or raise '
                     'data.validation_fraction')
  return batches


def for_training(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer,
                 num_shards: int) -> tuple[ShardedBatchIterator, list[dict[str, np.ndarray]]]:
  """(this process's training batch iterator, the eval batches) of a run's config; an empty source or split raises
  ConfigError naming the config field that points at it."""
  try:
    train_iter = ShardedBatchIterator(
        cfg.data, tokenizer, split='train', global_batch_size=cfg.train.batch_size, seed=cfg.data.shuffle_seed,
        num_shards=num_shards, process_index=jax.process_index(), process_count=jax.process_count())
    return train_iter, eval_batches(cfg.data, tokenizer, cfg.train.batch_size)
  except ValueError as e:
    where = f'config.data.mixture ({", ".join(cfg.data.mixture)})' if cfg.data.get('mixture') else (
        f'config.data.source={cfg.data.source!r}')
    raise config_lib.ConfigError(f'{where}: {e}') from e


def process_shards(num_shards: int, process_index: int, process_count: int) -> range:
  """The data shards process `process_index` reads: a contiguous run of num_shards / process_count of them."""
  if num_shards % process_count:
    raise ValueError(f'data.num_shards={num_shards} must be a multiple of the {process_count} processes')
  per_process = num_shards // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


class Stage(NamedTuple):
  """One curriculum stage: from global batch `start` on, rows are `seq_len` long and `fim_rate` of the training
  documents are in fill-in-the-middle form."""
  start: int
  seq_len: int
  fim_rate: float


def curriculum_stages(data_cfg: Any) -> list[Stage]:
  """`data.curriculum` ((start_step, seq_len, fim_rate), ...) as Stages, checked; () -> one stage of data.seq_len
  and data.fim_rate. Raises ValueError naming the field."""
  raw = tuple(data_cfg.get('curriculum', ()) or ())
  if not raw:
    return [Stage(0, int(data_cfg.seq_len), float(data_cfg.get('fim_rate', 0.0)))]
  stages = []
  for entry in raw:
    if len(entry) != 3:
      raise ValueError(f'data.curriculum: each stage is (start_step, seq_len, fim_rate), got {entry!r}')
    stage = Stage(int(entry[0]), int(entry[1]), float(entry[2]))
    if not 1 <= stage.seq_len <= int(data_cfg.seq_len):
      raise ValueError(f'data.curriculum: stage {entry!r} has seq_len outside [1, data.seq_len={data_cfg.seq_len}]')
    if not 0.0 <= stage.fim_rate <= 1.0:
      raise ValueError(f'data.curriculum: stage {entry!r} has fim_rate outside [0, 1]')
    if stages and stage.start <= stages[-1].start:
      raise ValueError('data.curriculum: stage start steps must increase')
    stages.append(stage)
  if stages[0].start != 0:
    raise ValueError(f'data.curriculum: the first stage must start at step 0, got {stages[0].start}')
  return stages


def stage_at(stages: Sequence[Stage], batch_index: int) -> int:
  """The index of the stage global batch `batch_index` (0-based) belongs to."""
  return max(i for i, stage in enumerate(stages) if stage.start <= batch_index)


class ShardedBatchIterator:
  """One process's rows of every global batch: its data shards' batches, concatenated in shard order, following the
  curriculum (`data.curriculum`).

  The global batch is the concatenation over shards 0..S-1 (S = data.num_shards), so it is the same for any number
  of processes dividing S: two processes reading shards {0} and {1} assemble exactly the batches one process
  reading {0, 1} sees. At a curriculum stage's first batch the shard iterators are rebuilt with the stage's seq_len
  and fim_rate (and a seed of their own, so a stage reads the documents in a new order, as a new epoch would).
  State: `get_state()` -> bytes (JSON of the batch count and every shard iterator's state) and `set_state(bytes)`,
  the protocol grain.checkpoint's orbax handler uses for non-grain iterators; a restored iterator continues in the
  same stage with exactly the batches that would have followed.
  """

  def __init__(self, data_cfg: Any, tokenizer: Tokenizer, *, split: str, global_batch_size: int, seed: int,
               num_shards: int, process_index: int = 0, process_count: int = 1, repeat: bool = True):
    if global_batch_size % num_shards:
      raise ValueError(f'the batch of {global_batch_size} rows does not split into {num_shards} data shards')
    self._data_cfg, self._tokenizer, self._split, self._seed, self._repeat = data_cfg, tokenizer, split, seed, repeat
    self._num_shards, self._shard_batch = num_shards, global_batch_size // num_shards
    self._shards = process_shards(num_shards, process_index, process_count)
    self.components = mixture.components(data_cfg, split)
    self.stages = curriculum_stages(data_cfg)
    self._batches = 0
    self._start_stage(0)

  def _start_stage(self, index: int) -> None:
    self._stage = index
    stage = self.stages[index]
    self._iterators = [
        iter(make_dataset(self._data_cfg, self._tokenizer, split=self._split, batch_size=self._shard_batch,
                          seed=self._seed + 1_000_003 * index, shard_index=shard, shard_count=self._num_shards,
                          repeat=self._repeat, components=self.components, seq_len=stage.seq_len,
                          fim_rate=stage.fim_rate))
        for shard in self._shards]

  @property
  def stage(self) -> Stage:
    """The curriculum stage of the next batch."""
    return self.stages[stage_at(self.stages, self._batches)]

  def __iter__(self) -> ShardedBatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    stage = stage_at(self.stages, self._batches)
    if stage != self._stage:
      self._start_stage(stage)
    parts = [next(it) for it in self._iterators]
    self._batches += 1
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

  def get_state(self) -> bytes:
    return json.dumps({'batches': self._batches, 'stage': self._stage,
                       'shards': [it.get_state() for it in self._iterators]}).encode()

  def set_state(self, state: bytes) -> None:
    state = json.loads(state)
    if isinstance(state, list):  # written before curriculum stages existed: the shard states alone
      state = {'batches': 0, 'stage': 0, 'shards': state}
    if len(state['shards']) != len(self._iterators):
      raise ValueError(f'the data iterator state holds {len(state["shards"])} shards, this process reads '
                       f'{len(self._iterators)}: resume with the same data.num_shards and number of processes')
    if state['stage'] >= len(self.stages):
      raise ValueError(f'the data iterator state is in curriculum stage {state["stage"]}, data.curriculum has '
                       f'{len(self.stages)}: resume with the same data.curriculum')
    self._batches = int(state['batches'])
    if state['stage'] != self._stage:
      self._start_stage(state['stage'])
    for it, s in zip(self._iterators, state['shards']):
      it.set_state(s)

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after a restore; the shard iterators prefetch on their own."""


def validate_config(d: ml_collections.ConfigDict) -> None:
  """The mixture, cleaning and curriculum fields of the `data` config section (checked without reading any data);
  raises ConfigError naming the field. (dsjax.config checks the schema; the data fields need this package.)"""
  for field, choices in (('mixture_unit', mixture.UNITS), ('dedup', ('none', 'exact', 'near')),
                         ('scrub_mode', ('mask', 'drop_document'))):
    if field in d:
      config_lib.check_choice(d, field, choices, prefix='data')
  for field in ('dedup_threshold', 'fim_rate', 'fim_spm_rate'):
    if field in d and not 0 <= d[field] <= 1:
      config_lib.fail(f'data.{field}', d[field], 'must be in [0, 1]')
  if 'balance_alpha' in d and d.balance_alpha < 0:
    config_lib.fail('data.balance_alpha', d.balance_alpha, 'must be >= 0')
  try:
    mixture.source_specs(d)
    curriculum_stages(d)
    mixture.scrub_config(d)
  except ValueError as e:
    raise config_lib.ConfigError(f'config.{e}') from None
