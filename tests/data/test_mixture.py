"""Mixtures, class balancing, fill-in-the-middle, curriculum stages and ArrayRecord sources, checked against counts
and orders computed here from the raw documents."""
import itertools
import os
import json
import random

import ml_collections
import numpy as np
import pytest

from dsjax.data import corpus, fim, mixture, pipeline
from dsjax.data import tokenizer as tokenizer_lib
from tests.data.conftest import make_data_cfg
from tests.data.test_corpus import oracle_is_validation

TOK = tokenizer_lib.ByteTokenizer()
P, S, M = TOK.fim_ids


def write_jsonl(path, alphabet, num_docs, seed, *, sizes=(40, 120), label=None):
  """Documents made only of `alphabet`, so the source of any token run is known from its bytes."""
  rng = random.Random(seed)
  with open(path, 'w') as f:
    for i in range(num_docs):
      text = ''.join(rng.choice(alphabet) for _ in range(rng.randint(*sizes)))
      record = {'text': text, 'lang': label(i) if label else ''}
      f.write(json.dumps(record) + '\n')
  return str(path)


def mixture_cfg(entries, **overrides):
  cfg = make_data_cfg(seq_len=64, validation_fraction=0.05, **overrides)
  cfg.mixture = ml_collections.ConfigDict(entries)
  return cfg


def segments(batch):
  """(source id, input tokens) of every segment of every row."""
  out = []
  for inputs, seg, src in zip(batch['inputs'], batch['segment_ids'], batch['source_ids']):
    for k in np.unique(seg[seg > 0]):
      sel = seg == k
      assert len(set(src[sel].tolist())) == 1
      out.append((int(src[sel][0]), inputs[sel]))
  return out


@pytest.fixture
def two_sources(tmp_path):
  a = write_jsonl(tmp_path / 'a.jsonl', 'ab', 300, 0, sizes=(40, 80))       # short documents
  b = write_jsonl(tmp_path / 'b.jsonl', 'xyz', 300, 1, sizes=(100, 300))   # long documents
  return a, b


@pytest.mark.parametrize('unit', ['tokens', 'documents'])
def test_mixture_proportions_and_source_ids(two_sources, unit):
  a, b = two_sources
  cfg = mixture_cfg({'a': dict(source=a, weight=3.0), 'b': dict(source=b, weight=1.0)}, mixture_unit=unit)
  ds = pipeline.make_dataset(cfg, TOK, split='train', batch_size=8, seed=0, repeat=True)
  tokens, docs = np.zeros(2), np.zeros(2)
  for batch in itertools.islice(iter(ds), 60):
    for source, inputs in segments(batch):
      text = TOK.decode(inputs)
      assert set(text) <= (set('ab') if source == 0 else set('xyz'))  # the tag names the true source
      tokens[source] += len(inputs)
      docs[source] += inputs[0] == TOK.bos_id  # first pieces of documents
  share = (tokens if unit == 'tokens' else docs) / (tokens if unit == 'tokens' else docs).sum()
  np.testing.assert_allclose(share, [0.75, 0.25], atol=0.04)
  shares = mixture.RealisedShares(['a', 'b'])
  shares.update(batch['source_ids'], batch['segment_ids'])
  assert shares.counts.tolist() == [int((batch['source_ids'][batch['segment_ids'] > 0] == i).sum()) for i in (0, 1)]


def test_class_balanced_sampling(tmp_path):
  sizes = {'py': 200, 'c': 40, 'go': 10}
  labels = [lang for lang, n in sizes.items() for _ in range(n)]
  path = write_jsonl(tmp_path / 'code.jsonl', 'abc', len(labels), 0, sizes=(50, 50), label=lambda i: labels[i])
  for alpha, want in ((0.0, [1 / 3] * 3), (1.0, [n / 250 for n in sizes.values()])):
    cfg = make_data_cfg(source=path, seq_len=64, validation_fraction=0.05, balance_by='lang', balance_alpha=alpha,
                        mixture_unit='documents')
    comps = mixture.components(cfg, 'train')
    assert sorted(c.name for c in comps) == ['data/c', 'data/go', 'data/py']
    by_name = {c.name.split('/')[1]: c for c in comps}
    for lang, n in sizes.items():  # each class holds its own documents, all of them
      names = set(by_name[lang].docs.names)
      assert names == {f'code.jsonl:{i + 1}' for i, l in enumerate(labels) if l == lang} - set(
          corpus.split_documents(corpus.list_documents(path), 'validation', 0.05).names)
    ds = pipeline.make_dataset(cfg, TOK, split='train', batch_size=8, seed=0, repeat=True)
    counts = np.zeros(3)
    order = [c.name.split('/')[1] for c in comps]
    for batch in itertools.islice(iter(ds), 40):
      for source, inputs in segments(batch):
        counts[source] += inputs[0] == TOK.bos_id
    got = dict(zip(order, counts / counts.sum()))
    np.testing.assert_allclose([got[k] for k in sizes], want, atol=0.05)  # rows are a shuffled part of a packing group


def test_mixture_config_errors(two_sources):
  a, _ = two_sources
  with pytest.raises(ValueError, match=r'data.mixture.a.weight'):
    mixture.source_specs(mixture_cfg({'a': dict(source=a, weight=0)}))
  with pytest.raises(ValueError, match=r'data.mixture.a: unknown key\(s\) wieght'):
    mixture.source_specs(mixture_cfg({'a': dict(source=a, wieght=1)}))
  with pytest.raises(ValueError, match=r'data.mixture.a.source: required'):
    mixture.source_specs(mixture_cfg({'a': dict(weight=1)}))
  with pytest.raises(ValueError, match='mixture_unit'):
    mixture.document_rates([], 'bytes')


def test_fim_permute_psm_and_spm_by_hand():
  class FixedRng:  # cut points 7 and 3 (sorted to 3, 7); random() decides SPM (< spm_rate) or PSM
    def __init__(self, r):
      self.r = r

    def integers(self, low, high, size):
      return np.array([7, 3])

    def random(self):
      return self.r

  tokens = np.arange(1, 11, dtype=np.int32)  # prefix 1 2 3 | middle 4 5 6 7 | suffix 8 9 10
  psm = fim.permute(tokens, (P, S, M), FixedRng(0.9), spm_rate=0.5)
  assert psm.tolist() == [P, 1, 2, 3, S, 8, 9, 10, M, 4, 5, 6, 7]
  spm = fim.permute(tokens, (P, S, M), FixedRng(0.1), spm_rate=0.5)
  assert spm.tolist() == [P, S, 8, 9, 10, M, 1, 2, 3, 4, 5, 6, 7]


def undo_fim(tokens):
  """The original document of a PSM or SPM token list (independent of fim.permute)."""
  tokens = list(tokens)
  assert tokens[0] == P
  s, m = tokens.index(S), tokens.index(M)
  if s == 1:  # SPM: P S suffix M prefix+middle
    return tokens[m + 1:] + tokens[2:m]
  return tokens[1:s] + tokens[m + 1:] + tokens[s + 1:m]


def test_fim_rate_one_rearranges_every_document_losslessly(tmp_path):
  path = write_jsonl(tmp_path / 'a.jsonl', 'abcdefgh', 50, 0, sizes=(10, 40))
  cfg = make_data_cfg(source=path, seq_len=64, fim_rate=1.0, fim_spm_rate=0.5)
  originals = {d.text for d in corpus.list_documents(path)}
  ds = pipeline.make_dataset(cfg, TOK, split='train', batch_size=4, seed=0, repeat=False)
  seen, orders = set(), set()
  for batch in ds:
    for _, inputs in segments(batch):
      assert inputs[0] == TOK.bos_id
      body = inputs[1:].tolist()
      orders.add('spm' if body[1] == S else 'psm')
      seen.add(TOK.decode(undo_fim(body)))
  assert seen == originals and orders == {'psm', 'spm'}
  # Validation batches never use FIM.
  val = pipeline.make_dataset(make_data_cfg(source=path, seq_len=64, fim_rate=1.0, validation_fraction=0.3), TOK,
                              split='validation', batch_size=4, seed=0, repeat=False)
  assert not any(np.isin(b['inputs'], [P, S, M]).any() for b in val)


def test_fim_needs_sentinel_tokens(tmp_path):
  path = write_jsonl(tmp_path / 'a.jsonl', 'ab', 5, 0)

  class NoFim(tokenizer_lib.ByteTokenizer):
    fim_ids = None

  with pytest.raises(ValueError, match='fill-in-the-middle tokens'):
    pipeline.make_dataset(make_data_cfg(source=path, fim_rate=0.5), NoFim(), split='train', batch_size=2, seed=0,
                          repeat=False)


def test_curriculum_changes_length_and_fim_rate_and_resumes_exactly(tmp_path, monkeypatch):
  monkeypatch.setattr(pipeline, 'PACK_GROUP_TOKENS', 512)  # restoring re-packs a group: keep them small
  path = write_jsonl(tmp_path / 'a.jsonl', 'abcdef', 200, 0, sizes=(20, 90))
  cfg = make_data_cfg(source=path, seq_len=64, curriculum=((0, 32, 0.0), (4, 64, 1.0)))

  def fresh():
    return pipeline.ShardedBatchIterator(cfg, TOK, split='train', global_batch_size=4, seed=0, num_shards=2)

  reference = list(itertools.islice(fresh(), 9))
  assert [b['inputs'].shape for b in reference] == [(4, 32)] * 4 + [(4, 64)] * 5
  assert not any(np.isin(b['inputs'], [P, S, M]).any() for b in reference[:4])
  starts = [inputs[:2].tolist() for b in reference[4:] for _, inputs in segments(b) if inputs[0] == TOK.bos_id]
  assert starts and all(s == [TOK.bos_id, P] for s in starts)  # every document in FIM form
  for k in (2, 4, 6):
    it = fresh()
    for _ in range(k):
      next(it)
    state = it.get_state()
    restored = fresh()
    restored.set_state(state)
    for want, got in zip(reference[k:], itertools.islice(restored, 9 - k)):
      for key in want:
        np.testing.assert_array_equal(want[key], got[key])
  with pytest.raises(ValueError, match='first stage must start at step 0'):
    pipeline.curriculum_stages(make_data_cfg(seq_len=64, curriculum=((1, 32, 0.0),)))
  with pytest.raises(ValueError, match='seq_len outside'):
    pipeline.curriculum_stages(make_data_cfg(seq_len=64, curriculum=((0, 128, 0.0),)))


def test_array_record_source(tmp_path):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'docs.array_record')
  writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
  records = [json.dumps({'text': 'def f():\n  return 1\n'}).encode(), 'plain text record ✓'.encode(),
             json.dumps({'text': 'x = 2'}).encode()]
  for r in records:
    writer.write(r)
  writer.close()
  docs = corpus.list_documents(path)
  assert docs.names == ['docs.array_record:0', 'docs.array_record:1', 'docs.array_record:2']
  assert [d.text for d in docs] == ['def f():\n  return 1\n', 'plain text record ✓', 'x = 2']
  assert docs.sizes == [len('def f():\n  return 1\n'), len('plain text record ✓'.encode()), 5]


def test_dedup_runs_across_sources_before_the_split(tmp_path):
  """A near copy of a validation document, placed in another source, must not reach the training split; the
  earliest copy (mixture order) is the one kept."""
  rng = random.Random(0)
  words = [''.join(rng.choice('abcdefghij') for _ in range(6)) for _ in range(400)]
  base = ' '.join(rng.choice(words) for _ in range(300))
  near = base.split()
  near[150] = 'changed'
  first = tmp_path / 'first'
  second = tmp_path / 'second'
  first.mkdir(), second.mkdir()
  # Unrelated documents in both, so every split has some.
  for i in range(12):
    (first / f'other{i}.txt').write_text(' '.join(rng.choice(words) for _ in range(200)))
    (second / f'more{i}.txt').write_text(' '.join(rng.choice(words) for _ in range(200)))
  (first / 'orig.txt').write_text(base)
  (second / 'copy.txt').write_text(' '.join(near))
  (second / 'exact.txt').write_text(base)
  cfg = mixture_cfg({'first': dict(source=str(first), weight=1.0), 'second': dict(source=str(second), weight=1.0)},
                    dedup='near', dedup_threshold=0.8, cache_dir=str(tmp_path / 'cache'))
  cfg.validation_fraction = 0.5
  names = {split: [n for c in mixture.components(cfg, split) for n in c.docs.names] for split in corpus.SPLITS}
  everything = names['train'] + names['validation']
  assert 'orig.txt' in everything and 'copy.txt' not in everything and 'exact.txt' not in everything
  assert sorted(everything) == sorted([f'other{i}.txt' for i in range(12)] + [f'more{i}.txt' for i in range(12)]
                                      + ['orig.txt'])
  _, summary = mixture.prepare(cfg)
  assert (summary['exact_duplicates'], summary['near_duplicates'], summary['kept']) == (1, 1, 25)
  assert os.listdir(tmp_path / 'cache' / 'prepared')  # the pass is cached ...
  cfg.dedup = 'none'  # ... per setting
  assert mixture.prepare(cfg)[1]['kept'] == 27


def test_scrubbing_masks_training_text_and_counts_categories(tmp_path):
  docs = tmp_path / 'docs'
  docs.mkdir()
  (docs / 'a.py').write_text('AUTHOR = "Jane Roe <jane.roe@corp-mail.net>"\nHOST = "93.184.216.34"\n')
  (docs / 'b.py').write_text('def f():\n    return 1\n')
  cfg = make_data_cfg(source=str(docs), seq_len=128, scrub='all', cache_dir=str(tmp_path / 'cache'))
  _, summary = mixture.prepare(cfg)
  assert summary['scrub_counts'] == {'email': 1, 'ipv4': 1} and summary['scrubbed_documents'] == 1
  texts = [TOK.decode(inputs) for b in pipeline.make_dataset(cfg, TOK, split='train', batch_size=2, seed=0,
                                                             repeat=False) for _, inputs in segments(b)]
  joined = '\n'.join(texts)
  assert '<EMAIL>' in joined and '<IP_ADDRESS>' in joined and 'return 1' in joined
  assert 'jane.roe@' not in joined and '93.184.216.34' not in joined
  cfg.scrub_mode = 'drop_document'
  comps = mixture.components(cfg, 'train')
  assert [n for c in comps for n in c.docs.names] == ['b.py']


def test_a_source_without_held_out_documents_is_left_out_of_validation(two_sources, tmp_path):
  a, _ = two_sources
  small = tmp_path / 'small'
  small.mkdir()
  names = [f'doc{i}.txt' for i in range(40) if not oracle_is_validation(f'doc{i}.txt', 0.05)][:3]
  for name in names:  # three documents, all in train by the split's hash
    (small / name).write_text(f'text of {name}')
  cfg = mixture_cfg({'a': dict(source=a, weight=1.0), 'small': dict(source=str(small), weight=1.0)})
  assert [c.name for c in mixture.components(cfg, 'train')] == ['a', 'small']
  assert [c.name for c in mixture.components(cfg, 'validation')] == ['a']
  cfg.mixture = ml_collections.ConfigDict({'small': dict(source=str(small), weight=1.0)})
  with pytest.raises(ValueError, match="'validation' split"):
    mixture.components(cfg, 'validation')
