"""The grain pipeline: packed rows hold exactly the expected document pieces; order, resume and sharding."""
import collections
import itertools
import json

import grain
import numpy as np
import pytest

from dsjax.data import corpus, mixture, pipeline
from dsjax.data import tokenizer as tokenizer_lib
from tests.data.conftest import make_data_cfg

SEQ_LEN = 32
BATCH = 4


@pytest.fixture(params=[256, 2048], ids=['8_rows_per_group', '64_rows_per_group'])
def group_tokens(request, monkeypatch):
  """Packing groups of 8 rows (many groups per epoch) and 64 rows (about one epoch of the tiny corpus).

  The production size (PACK_GROUP_TOKENS / SEQ_LEN = 8192 rows) is kept for one-pass tests only: with repeat=True it
  would pack ~50 epochs of the tiny corpus before the first batch.
  """
  monkeypatch.setattr(pipeline, 'PACK_GROUP_TOKENS', request.param)
  return request.param


@pytest.fixture
def small_groups(monkeypatch):
  monkeypatch.setattr(pipeline, 'PACK_GROUP_TOKENS', 256)


@pytest.fixture(scope='module')
def bpe(tmp_path_factory):
  path = tmp_path_factory.mktemp('bpe') / 'tokenizer.json'
  texts = ['def return class import os naïve λ 数据 😀 (x) : #'] * 20
  return tokenizer_lib.train_bpe(texts, 300, path)


def expected_pieces(texts, tok, seq_len):
  """Oracle: each document as [bos] + encode(text) + [eos], its next-token pairs cut every seq_len pairs."""
  pieces = collections.Counter()
  for text in texts:
    toks = [tok.bos_id] + [int(t) for t in tok.encode(text)] + [tok.eos_id]
    inputs, targets = toks[:-1], toks[1:]
    for start in range(0, len(inputs), seq_len):
      pieces[(tuple(inputs[start:start + seq_len]), tuple(targets[start:start + seq_len]))] += 1
  return pieces


def split_rows(batches, pad_id):
  """Checks the row invariants and returns the Counter of (inputs, targets) segments and the number of rows."""
  pieces = collections.Counter()
  rows = 0
  for b in batches:
    assert set(b) == {'inputs', 'targets', 'segment_ids', 'positions', 'source_ids'}
    for v in b.values():
      assert v.dtype == np.int32 and v.shape == (BATCH, SEQ_LEN)
    for inputs, targets, seg, pos in zip(b['inputs'], b['targets'], b['segment_ids'], b['positions']):
      rows += 1
      pad = seg == 0
      assert (inputs[pad] == pad_id).all() and (targets[pad] == pad_id).all() and (pos[pad] == 0).all()
      ids = seg[~pad]
      if ids.size:
        assert not pad[:ids.size].any()  # padding only at the end of a row
        assert ids.tolist() == sorted(ids.tolist()) and ids[0] == 1 and set(np.diff(ids)) <= {0, 1}
      for k in np.unique(ids):
        sel = seg == k
        assert pos[sel].tolist() == list(range(sel.sum()))  # positions restart at 0 per segment
        assert (targets[sel][:-1] == inputs[sel][1:]).all()  # next-token pairs within the segment
        pieces[(tuple(inputs[sel].tolist()), tuple(targets[sel].tolist()))] += 1
  return pieces, rows


def train_ds(source, tok, **kw):
  cfg = make_data_cfg(source=source, seq_len=SEQ_LEN, validation_fraction=kw.pop('validation_fraction', 0.0))
  args = dict(split='train', batch_size=BATCH, seed=0, repeat=False)
  args.update(kw)
  return pipeline.make_dataset(cfg, tok, **args)


@pytest.mark.parametrize('group', [None, 256, 2048])
@pytest.mark.parametrize('tok_name', ['byte', 'bpe'])
def test_one_epoch_holds_exactly_the_expected_pieces(corpus_dir, monkeypatch, group, tok_name, bpe):
  root, expected = corpus_dir
  if group is not None:
    monkeypatch.setattr(pipeline, 'PACK_GROUP_TOKENS', group)
  tok = tokenizer_lib.ByteTokenizer() if tok_name == 'byte' else bpe
  want = expected_pieces(expected.values(), tok, SEQ_LEN)
  assert any(len(p[0]) == SEQ_LEN for p in want) and any(len(p[0]) < SEQ_LEN // 2 for p in want)
  ds = train_ds(root, tok)
  assert isinstance(ds, grain.IterDataset)
  it = iter(ds)
  assert isinstance(it, grain.DatasetIterator)
  got, rows = split_rows(it, tok.pad_id)
  assert got == want
  # Packing leaves little room: fewer rows than pieces, and at most one partial batch of padding rows.
  min_rows = -(-sum(len(p[0]) * n for p, n in want.items()) // SEQ_LEN)
  assert min_rows <= rows < sum(want.values())


def test_jsonl_source_and_validation_split(jsonl_file):
  path, expected = jsonl_file
  tok = tokenizer_lib.ByteTokenizer()
  cfg = make_data_cfg(source=path, seq_len=SEQ_LEN, validation_fraction=0.5)
  val_names = [n for n in expected if corpus.is_validation(n, 0.5)]
  assert val_names and len(val_names) < len(expected)
  ds = pipeline.make_dataset(cfg, tok, split='validation', batch_size=BATCH, seed=0, repeat=False)
  first, second = list(ds), list(ds)
  got, rows = split_rows(first, tok.pad_id)
  assert got == expected_pieces([expected[n] for n in val_names], tok, SEQ_LEN)
  for a, b in zip(first, second, strict=True):  # deterministic order
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # The last partial batch is padded with empty rows: every batch is full-size, the empty rows only at the end.
  row_used = np.concatenate([(b['segment_ids'] > 0).any(axis=1) for b in first])
  assert row_used.size % BATCH == 0 and row_used.size - BATCH < rows
  assert row_used.tolist() == sorted(row_used.tolist(), reverse=True)


def take(ds_or_it, n):
  it = iter(ds_or_it)
  return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for a, b in zip(xs, ys):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def batches_differ(xs, ys):
  return any(not np.array_equal(a[k], b[k]) for a, b in zip(xs, ys) for k in a)


def test_same_seed_same_batches_different_seed_different_order(corpus_dir, group_tokens):
  root, _ = corpus_dir
  tok = tokenizer_lib.ByteTokenizer()
  a = take(train_ds(root, tok, seed=3, repeat=True), 12)
  b = take(train_ds(root, tok, seed=3, repeat=True), 12)
  c = take(train_ds(root, tok, seed=4, repeat=True), 12)
  assert_batches_equal(a, b)
  assert batches_differ(a, c)


def docs_ds(docs, **kwargs):
  """The document order of a one-source mixture: (0, document) pairs."""
  return mixture.mixed_documents([mixture.Component('data', docs, 1.0)], unit='documents', **kwargs)


def test_epochs_are_reshuffled(corpus_dir):
  root, expected = corpus_dir
  docs = corpus.list_documents(root)
  n = len(docs)
  ds = docs_ds(docs, seed=0, shuffle=True, repeat=True)
  epochs = [[ds[i][1].name for i in range(e * n, (e + 1) * n)] for e in range(3)]
  for names in epochs:
    assert sorted(names) == sorted(expected)  # each epoch is a permutation of all documents
  assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
  assert epochs[0] != docs.names  # shuffled
  again = docs_ds(docs, seed=0, shuffle=True, repeat=True)
  assert [again[i][1].name for i in range(n, 2 * n)] == epochs[1]
  # Without shuffle: source order, one pass.
  plain = docs_ds(docs, seed=0, shuffle=False, repeat=False)
  assert [d.name for _, d in plain] == docs.names


def test_repeat_goes_past_one_epoch_with_every_piece(corpus_dir, small_groups):
  root, expected = corpus_dir
  tok = tokenizer_lib.ByteTokenizer()
  one_epoch = expected_pieces(expected.values(), tok, SEQ_LEN)
  got, _ = split_rows(take(train_ds(root, tok, repeat=True), 60), tok.pad_id)
  assert set(got) == set(one_epoch)  # 60 batches of 4 rows of 32 tokens: several epochs
  assert sum(got.values()) > 2 * sum(one_epoch.values())


@pytest.mark.parametrize('repeat', [True, False])
def test_resume_from_saved_state_continues_exactly(corpus_dir, group_tokens, repeat):
  root, _ = corpus_dir
  tok = tokenizer_lib.ByteTokenizer()
  ds = train_ds(root, tok, repeat=repeat, seed=7)
  reference = list(itertools.islice(iter(ds), 40))
  total = len(reference)
  assert total >= 8
  for k in sorted({0, 1, 3, total // 2, total - 1}):
    it = iter(ds)
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    continued = list(itertools.islice(it, 40 - k))
    fresh = iter(ds)
    fresh.set_state(state)
    restored = list(itertools.islice(fresh, 40 - k))
    assert_batches_equal(continued, reference[k:])
    assert_batches_equal(restored, reference[k:])


@pytest.mark.parametrize('shard_count', [2, 3])
def test_shards_read_disjoint_documents_covering_all(corpus_dir, shard_count):
  root, expected = corpus_dir
  tok = tokenizer_lib.ByteTokenizer()
  docs = corpus.list_documents(root)
  shard_names = [{d.name for _, d in docs_ds(docs, seed=0, shuffle=True, repeat=False, shard_index=i,
                                             shard_count=shard_count)}
                 for i in range(shard_count)]
  assert sum(len(s) for s in shard_names) == len(expected)
  assert set().union(*shard_names) == set(expected)
  # End to end: each shard's batches hold exactly the pieces of its own documents.
  for i, names in enumerate(shard_names):
    got, _ = split_rows(train_ds(root, tok, shard_index=i, shard_count=shard_count), tok.pad_id)
    assert got == expected_pieces([expected[n] for n in names], tok, SEQ_LEN)


def test_bad_arguments_raise(corpus_dir, tmp_path):
  root, expected = corpus_dir
  tok = tokenizer_lib.ByteTokenizer()
  with pytest.raises(FileNotFoundError, match='nowhere'):
    train_ds(str(tmp_path / 'nowhere'), tok)
  with pytest.raises(ValueError, match="'validation' split .* has no documents"):
    train_ds(root, tok, split='validation')
  with pytest.raises(ValueError, match='shard_index'):
    train_ds(root, tok, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match='has no documents'):
    train_ds(root, tok, shard_index=len(expected), shard_count=len(expected) + 1)
  with pytest.raises(ValueError, match='seq_len'):
    pipeline.make_dataset(make_data_cfg(source=root, seq_len=0), tok, split='train', batch_size=2, seed=0,
                          repeat=False)


def test_document_pieces_cover_every_target_once():
  tokens = np.arange(100, dtype=np.int32)
  pieces = pipeline.document_pieces(tokens, 32, source_id=5)
  assert [p.shape for p in pieces] == [(32, 3), (32, 3), (32, 3), (3, 3)]
  assert np.concatenate([p[:, 0] for p in pieces]).tolist() == list(range(0, 99))
  assert np.concatenate([p[:, 1] for p in pieces]).tolist() == list(range(1, 100))
  assert np.concatenate([p[:, 2] for p in pieces]).tolist() == [5] * 99
