"""Fixtures for the data tests: a tiny corpus on disk whose expected documents are known independently."""
import json
import random

import ml_collections
import pytest

_WORDS = ['def', 'return', 'x', 'λ', 'naïve', '数据', '😀', 'class', '\n', '    ', '(x)', ':', 'import os', '#']


def _text(rng: random.Random, num_words: int) -> str:
  return ' '.join(rng.choice(_WORDS) for _ in range(num_words)) + f' #{num_words}'  # the suffix keeps texts distinct


@pytest.fixture
def corpus_dir(tmp_path):
  """A directory corpus; returns (root, {expected document name: expected text}).

  Documents: 12 text files of 0..90 words (so with seq_len 32 some are one piece and some several), nested, one with
  invalid UTF-8. Not documents: an empty file, a hidden file, a hidden directory, a binary file, __pycache__.
  """
  rng = random.Random(0)
  root = tmp_path / 'corpus'
  expected = {}
  for i, n in enumerate([0, 1, 3, 5, 8, 13, 21, 34, 55, 90, 2, 40]):
    name = f'pkg{i % 3}/sub{i % 2}/doc{i:02d}.py' if i % 4 else f'doc{i:02d}.txt'
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _text(rng, n)
    path.write_text(text, encoding='utf-8')
    expected[name] = text
  (root / 'bad_utf8.txt').write_bytes(b'caf\xe9 ok \xff\xfe end')
  expected['bad_utf8.txt'] = b'caf\xe9 ok \xff\xfe end'.decode('utf-8', errors='replace')
  (root / 'empty.txt').write_bytes(b'')
  (root / '.hidden.txt').write_text('hidden')
  (root / '.git').mkdir()
  (root / '.git' / 'config').write_text('not a document')
  (root / 'image.bin').write_bytes(b'\x89PNG\x00\x01\x02')
  (root / '__pycache__').mkdir()
  (root / '__pycache__' / 'doc.cpython-311.pyc').write_bytes(b'\x00\x01')
  return str(root), expected


@pytest.fixture
def jsonl_file(tmp_path):
  """A JSONL corpus; returns (path, {expected name: expected text}). Blank lines are skipped; names are 1-based."""
  rng = random.Random(1)
  path = tmp_path / 'docs.jsonl'
  lines, expected = [], {}
  for lineno in range(1, 9):
    if lineno == 4:
      lines.append('')
      continue
    text = _text(rng, lineno * 7)
    lines.append(json.dumps({'text': text, 'id': lineno}, ensure_ascii=lineno % 2 == 0))
    expected[f'docs.jsonl:{lineno}'] = text
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return str(path), expected


def make_data_cfg(**overrides) -> ml_collections.ConfigDict:
  """cfg.data with the fields of configs/base.py, tiny defaults."""
  cfg = ml_collections.ConfigDict(dict(source='stdlib', include_stdlib_tests=False, jsonl_field='text',
                                       validation_fraction=0.0, tokenizer='byte', seq_len=32, shuffle_seed=0,
                                       num_threads=1, eval_batches=4))
  cfg.update(overrides)
  return cfg
