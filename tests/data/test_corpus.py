"""Document sources and the train/validation split, against lists and hashes computed here."""
import hashlib
import os
import sysconfig

import pytest

from dsjax.data import corpus
from dsjax.data import mixture
from tests.data.conftest import make_data_cfg


def oracle_is_validation(name: str, fraction: float) -> bool:
  """The split rule, recomputed independently: first 8 bytes of sha256(name) as a fraction of 2**64."""
  h = hashlib.sha256(name.encode('utf-8')).digest()
  return int.from_bytes(h[:8], 'big') < fraction * 2**64


def test_directory_lists_text_files_sorted_and_reads_them(corpus_dir):
  root, expected = corpus_dir
  docs = corpus.list_documents(root)
  assert docs.names == sorted(expected)
  assert len(docs) == len(expected)
  for i, name in enumerate(docs.names):
    doc = docs[i]
    assert doc.name == name and doc.text == expected[name]


def test_single_file_source(corpus_dir):
  root, expected = corpus_dir
  docs = corpus.list_documents(os.path.join(root, 'doc04.txt'))
  assert docs.names == ['doc04.txt'] and docs[0].text == expected['doc04.txt']


def test_jsonl_one_document_per_line(jsonl_file):
  path, expected = jsonl_file
  docs = corpus.list_documents(path)
  assert docs.names == list(expected)
  assert [d.text for d in docs] == list(expected.values())
  # Another field: the ids are ints, so reading fails with a clear message naming file, line and field.
  docs = corpus.list_documents(path, jsonl_field='id')
  with pytest.raises(ValueError, match=r"docs\.jsonl:1.*'id'"):
    docs[0]
  docs = corpus.list_documents(path, jsonl_field='body')
  with pytest.raises(ValueError, match=r"docs\.jsonl:1: no field 'body'"):
    docs[0]


@pytest.mark.parametrize('fraction', [0.3, 0.5])
def test_split_is_disjoint_complete_and_matches_the_hash(corpus_dir, fraction):
  root, expected = corpus_dir
  docs = corpus.list_documents(root)
  train = corpus.split_documents(docs, 'train', fraction)
  val = corpus.split_documents(docs, 'validation', fraction)
  assert set(train.names).isdisjoint(val.names)
  assert sorted(train.names + val.names) == sorted(expected)
  assert val.names == [n for n in sorted(expected) if oracle_is_validation(n, fraction)]
  assert train.names == [n for n in sorted(expected) if not oracle_is_validation(n, fraction)]
  assert [d.text for d in val] == [expected[n] for n in val.names]


def test_load_split_reads_the_config(jsonl_file):
  path, expected = jsonl_file
  cfg = make_data_cfg(source=path, validation_fraction=0.5)
  val = mixture.load_split(cfg, 'validation')
  assert val.names == [n for n in expected if oracle_is_validation(n, 0.5)]


def test_stdlib_listing_and_split():
  root = sysconfig.get_paths()['stdlib']
  docs = corpus.list_documents('stdlib')
  names = docs.names
  assert 300 < len(names) < 3000, len(names)
  assert len(set(names)) == len(names)
  assert all(n.endswith('.py') for n in names)
  parts = [set(n.split('/')[:-1]) for n in names]
  assert not any(p & {'site-packages', 'dist-packages', '__pycache__'} for p in parts)
  assert not any(p & {'test', 'tests', 'idle_test'} for p in parts)
  for must in ['os.py', 'json/decoder.py', 'asyncio/tasks.py']:
    assert must in names
  assert os.path.isfile(os.path.join(root, 'json', 'decoder.py'))
  assert docs[names.index('json/__init__.py')].text.startswith(open(os.path.join(root, 'json', '__init__.py')).read(50))
  with_tests = corpus.list_documents('stdlib', include_stdlib_tests=True).names
  assert set(names) < set(with_tests)
  assert any(n.startswith('test/') for n in with_tests)

  fraction = 0.05
  train = corpus.split_documents(docs, 'train', fraction).names
  val = corpus.split_documents(docs, 'validation', fraction).names
  assert set(train).isdisjoint(val) and sorted(train + val) == sorted(names)
  assert val == [n for n in names if oracle_is_validation(n, fraction)]
  assert 0.02 < len(val) / len(names) < 0.09  # binomial(~730, 0.05): mean 0.05, std 0.008


def test_missing_path_names_it(tmp_path):
  missing = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match='nope'):
    corpus.list_documents(missing)


def test_empty_sources_raise(tmp_path):
  (tmp_path / 'empty_dir').mkdir()
  with pytest.raises(ValueError, match='no documents'):
    corpus.list_documents(str(tmp_path / 'empty_dir'))
  (tmp_path / 'empty.jsonl').write_text('\n\n')
  with pytest.raises(ValueError, match='no documents'):
    corpus.list_documents(str(tmp_path / 'empty.jsonl'))
  (tmp_path / 'empty.txt').write_text('')
  with pytest.raises(ValueError, match='no documents'):
    corpus.list_documents(str(tmp_path / 'empty.txt'))


def test_empty_split_and_bad_arguments_raise(corpus_dir):
  root, _ = corpus_dir
  docs = corpus.list_documents(root)
  with pytest.raises(ValueError, match="'validation' split .* has no documents"):
    corpus.split_documents(docs, 'validation', 0.0)
  with pytest.raises(ValueError, match="'train' split .* has no documents"):
    corpus.split_documents(docs, 'train', 1.0)
  with pytest.raises(ValueError, match='split must be one of'):
    corpus.split_documents(docs, 'test', 0.1)
  with pytest.raises(ValueError, match='validation_fraction'):
    corpus.split_documents(docs, 'train', 1.5)

