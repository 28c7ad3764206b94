"""The grain input pipeline: documents -> shuffled, tokenized, packed, fixed-shape batches.

  documents of one split (corpus.load_split)
    -> this process's shard, by document           MapDataset slicing   [shard_index::shard_count]
    -> shuffled by document, reshuffled per epoch   MapDataset.shuffle(seed) then .repeat()
    -> [bos] + encode(text) + [eos], cut in pieces  MapDataset.map, run on grain read threads (data.num_threads)
    -> one element per piece                        grain.experimental.FlatMapIterDataset
    -> packed into rows of seq_len, rows shuffled   grain.experimental.FirstFitPackIterDataset
       within each packing group
    -> batches [batch_size, seq_len]                IterDataset.batch (the last partial batch padded with empty rows)
    -> background thread                            grain.experimental.ThreadPrefetchIterDataset

A batch is a dict of int32 numpy arrays, all [batch_size, seq_len]:
  inputs       token ids; targets  the next token of the same document (inputs shifted left by one within a segment);
  segment_ids  1, 2, ... numbers the document pieces within a row, 0 = padding (loss mask: segment_ids > 0);
  positions    position within the piece, restarting at 0 at each piece start.
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

import json
import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from dsjax.data import corpus
from dsjax.data.tokenizer import Tokenizer

# Tokens per packing group: FirstFit fills ceil(PACK_GROUP_TOKENS / seq_len) rows at once (at least batch_size), then
# emits them in shuffled order. Larger groups waste less padding and mix more documents into a batch; restoring an
# iterator re-packs at most one group.
PACK_GROUP_TOKENS = 1 << 18
# Documents tokenized ahead by the read threads.
READ_PREFETCH_DOCS = 64
# Batches prepared ahead by the background thread.
PREFETCH_BATCHES = 2


def document_pieces(tokens: np.ndarray, seq_len: int) -> list[np.ndarray]:
  """Next-token pairs of one document cut into pieces of at most `seq_len` pairs.

  `tokens` [n] is the whole document, [bos, ..., eos]. Its pairs are [n - 1, 2]: column 0 the inputs tokens[:-1],
  column 1 the targets tokens[1:]; piece k holds pairs [k * seq_len, (k + 1) * seq_len). Each piece later becomes its
  own segment with positions from 0: the standard practice for fixed-length rows (a document longer than a row is
  continued in another row, and attention cannot reach across rows anyway). No text is thrown away: every token after
  bos is a target exactly once.
  """
  pairs = np.stack([tokens[:-1], tokens[1:]], axis=1)
  return [pairs[s:s + seq_len] for s in range(0, len(pairs), seq_len)]


class _TokenizeDocument:
  """corpus.Document -> its pieces as packer elements {'pairs': [piece_len, 2]}. Runs on grain read threads."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int):
    self._tokenizer = tokenizer
    self._seq_len = seq_len
    self._bos = np.asarray([tokenizer.bos_id], np.int32)
    self._eos = np.asarray([tokenizer.eos_id], np.int32)

  def __call__(self, doc: corpus.Document) -> list[dict[str, np.ndarray]]:
    ids = np.asarray(self._tokenizer.encode(doc.text), dtype=np.int32)
    tokens = np.concatenate([self._bos, ids, self._eos])
    return [{'pairs': piece} for piece in document_pieces(tokens, self._seq_len)]


class _Unlist(grain.experimental.FlatMapTransform):
  """A list of pieces -> the pieces, one element each."""
  max_fan_out = 1 << 20  # only read by FlatMapMapDataset; the IterDataset flat map has no fan-out limit

  def flat_map(self, element: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    return element


class _ToBatch:
  """Packed rows -> the batch dict, padding the last partial batch with empty rows.

  Hand-written because the packed feature is the [seq_len, 2] `pairs` (split here into inputs and targets), grain's
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
    for i, row in enumerate(rows):
      seg[i] = row['pairs_segment_ids']
      pos[i] = row['pairs_positions']
      inputs[i] = row['pairs'][:, 0]
      targets[i] = row['pairs'][:, 1]
    inputs[seg == 0] = self._pad_id
    targets[seg == 0] = self._pad_id
    return {'inputs': inputs, 'targets': targets, 'segment_ids': seg, 'positions': pos}


def document_dataset(docs: corpus.DocumentSource, *, seed: int, shuffle: bool, repeat: bool, shard_index: int = 0,
                     shard_count: int = 1) -> grain.MapDataset:
  """The documents this process reads, in reading order: shard `shard_index::shard_count` of `docs`, shuffled with
  `seed` if `shuffle`, repeated forever if `repeat`.

  Shuffle comes before repeat: grain's ShuffleMapDataset reseeds with seed + epoch for indices past the first epoch
  (RepeatMapDataset passes them through), so every epoch is a different permutation of the same documents.
  """
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f'need 0 <= shard_index < shard_count, got shard_index={shard_index}, shard_count={shard_count}')
  ds = grain.MapDataset.source(docs)[shard_index::shard_count]
  if len(ds) == 0:
    raise ValueError(f'shard {shard_index} of {shard_count} of {docs!r} has no documents (fewer documents than '
                     'processes)')
  if shuffle:
    ds = ds.shuffle(seed=seed % 2**32)
  if repeat:
    ds = ds.repeat()
  return ds


def make_dataset(data_cfg: Any, tokenizer: Tokenizer, *, split: str, batch_size: int, seed: int,
                 shard_index: int = 0, shard_count: int = 1, repeat: bool,
                 shuffle: bool | None = None) -> grain.IterDataset:
  """The batches of `split` for one process, as a grain IterDataset (see the module docstring for the format).

  Args:
    data_cfg: `cfg.data` (source, include_stdlib_tests, jsonl_field, validation_fraction, seq_len, num_threads).
    tokenizer: a `Tokenizer`; each document becomes [bos] + encode(text) + [eos].
    split: 'train' or 'validation'.
    batch_size: rows per batch for this process (the global batch / shard_count).
    seed: document shuffle and packing-group shuffle seed (e.g. `cfg.data.shuffle_seed`).
    shard_index, shard_count: this process reads documents shard_index::shard_count (jax.process_index() /
      jax.process_count()), so processes read disjoint documents.
    repeat: True: endless, each epoch in a new order. False: one pass, then StopIteration; the last partial batch is
      padded with empty rows (segment 0), so shapes stay fixed and every token is seen exactly once.
    shuffle: shuffle documents and rows; default True for 'train', False for 'validation' (a fixed order).

  Returns:
    IterDataset of {'inputs', 'targets', 'segment_ids', 'positions'}: int32 [batch_size, seq_len]. Its iterator is a
    grain DatasetIterator with exact get_state() / set_state().
  """
  seq_len = int(data_cfg.seq_len)
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f'data.seq_len and batch_size must be positive, got seq_len={seq_len}, batch_size={batch_size}')
  if shuffle is None:
    shuffle = split == 'train'
  docs = corpus.load_split(data_cfg, split)
  ds = document_dataset(docs, seed=seed, shuffle=shuffle, repeat=repeat, shard_index=shard_index,
                        shard_count=shard_count)
  ds = ds.map(_TokenizeDocument(tokenizer, seq_len))
  num_threads = int(data_cfg.num_threads)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=READ_PREFETCH_DOCS if num_threads else 0))
  ds = grain.experimental.FlatMapIterDataset(ds, _Unlist())
  # FirstFit packing rather than ConcatThenSplit: a document's pieces depend on the document alone (cut at multiples
  # of seq_len from its start), so every document starting in a row starts there with bos at position 0, a document
  # shorter than a row is never split across two rows, the pieces are the same every epoch, and a test can compute
  # them independently. The price is a little padding at the end of some rows (small with large groups; see
  # PACK_GROUP_TOKENS), where ConcatThenSplit would leave none but would cut documents wherever a row ends.
  # Inputs and targets travel as one [len, 2] feature: grain's packer costs ~0.15 ms per element and feature, so one
  # feature packs about 30% faster than two.
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={'pairs': seq_len},
      num_packing_bins=max(batch_size, math.ceil(PACK_GROUP_TOKENS / seq_len)), seed=seed % 2**32,
      shuffle_bins=shuffle)
  ds = ds.batch(batch_size, batch_fn=_ToBatch(batch_size, tokenizer.pad_id))
  return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=PREFETCH_BATCHES)


def process_shards(num_shards: int, process_index: int, process_count: int) -> range:
  """The data shards process `process_index` reads: a contiguous run of num_shards / process_count of them."""
  if num_shards % process_count:
    raise ValueError(f'data.num_shards={num_shards} must be a multiple of the {process_count} processes')
  per_process = num_shards // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


class ShardedBatchIterator:
  """One process's rows of every global batch: its data shards' batches, concatenated in shard order.

  The global batch is the concatenation over shards 0..S-1 (S = data.num_shards), so it is the same for any number
  of processes dividing S: two processes reading shards {0} and {1} assemble exactly the batches one process
  reading {0, 1} sees. State: `get_state()` -> bytes (JSON of every shard iterator's state) and
  `set_state(bytes)`, the protocol grain.checkpoint's orbax handler uses for non-grain iterators.
  """

  def __init__(self, data_cfg: Any, tokenizer: Tokenizer, *, split: str, global_batch_size: int, seed: int,
               num_shards: int, process_index: int = 0, process_count: int = 1, repeat: bool = True):
    if global_batch_size % num_shards:
      raise ValueError(f'the batch of {global_batch_size} rows does not split into {num_shards} data shards')
    self._iterators = [
        iter(make_dataset(data_cfg, tokenizer, split=split, batch_size=global_batch_size // num_shards, seed=seed,
                          shard_index=shard, shard_count=num_shards, repeat=repeat))
        for shard in process_shards(num_shards, process_index, process_count)]

  def __iter__(self) -> ShardedBatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self._iterators]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

  def get_state(self) -> bytes:
    return json.dumps([it.get_state() for it in self._iterators]).encode()

  def set_state(self, state: bytes) -> None:
    states = json.loads(state)
    if len(states) != len(self._iterators):
      raise ValueError(f'the data iterator state holds {len(states)} shards, this process reads '
                       f'{len(self._iterators)}: resume with the same data.num_shards and number of processes')
    for it, s in zip(self._iterators, states):
      it.set_state(s)

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after a restore; the shard iterators prefetch on their own."""
