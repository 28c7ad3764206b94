"""Tokenizers: byte round trips against str.encode, a tiny trained BPE, specials, errors, the CLI."""
import json
import os

import numpy as np
import pytest
import tokenizers

from dsjax.data import tokenizer as tokenizer_lib

TEXTS = ['', 'hello world', 'naïve café — λx. 数据 😀\n\tdef f():\n    return 1\n', 'a' * 300, '<s> looks special </s>']


@pytest.mark.parametrize('text', TEXTS)
def test_byte_tokenizer_round_trip(text):
  tok = tokenizer_lib.ByteTokenizer()
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  assert ids.tolist() == list(text.encode('utf-8'))
  assert tok.decode(ids) == text
  assert tok.decode(list(ids)) == text
  assert tok.token_byte_lengths()[ids].sum() == len(text.encode('utf-8'))


def test_byte_tokenizer_specials_and_invalid_utf8():
  tok = tokenizer_lib.ByteTokenizer()
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (262, 256, 257, 258)
  lengths = tok.token_byte_lengths()
  assert lengths.shape == (262,) and lengths[:256].tolist() == [1] * 256 and lengths[256:].tolist() == [0] * 6
  assert tok.decode([257, ord('h'), ord('i'), 258, 256]) == 'hi'
  assert tok.decode([0xff, ord('a'), 0xc3]) == '\ufffda\ufffd'
  assert tok.decode(np.array([[104, 105]])) == 'hi'
  assert isinstance(tok, tokenizer_lib.Tokenizer)
  assert isinstance(tokenizer_lib.load_tokenizer('byte'), tokenizer_lib.ByteTokenizer)


@pytest.fixture(scope='module')
def bpe_path(tmp_path_factory):
  """A 320-token byte-level BPE trained on a few KB of Python-like text."""
  texts = [f'def function_{i}(x, y):\n    return x * {i} + y  # naïve λ\n' * 3 for i in range(60)]
  assert 5_000 < sum(len(t) for t in texts) < 20_000
  path = tmp_path_factory.mktemp('bpe') / 'tokenizer.json'
  tokenizer_lib.train_bpe(texts, 320, path)
  return str(path)


def test_trained_bpe_round_trips(bpe_path):
  tok = tokenizer_lib.load_tokenizer(bpe_path)
  assert isinstance(tok, tokenizer_lib.HFTokenizer) and isinstance(tok, tokenizer_lib.Tokenizer)
  assert tok.vocab_size == 320
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.fim_ids) == (0, 1, 2, (3, 4, 5))
  lengths = tok.token_byte_lengths()
  assert lengths.shape == (320,) and lengths[:6].tolist() == [0] * 6 and (lengths[6:] >= 1).all()
  for text in TEXTS + ['def function_7(x, y):\n    return x * 7 + y\n']:
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert tok.decode(ids) == text
    assert lengths[ids].sum() == len(text.encode('utf-8'))
    assert not np.isin(ids, [tok.pad_id, tok.bos_id, tok.eos_id]).any()  # special-looking text stays text
  ids = tok.encode('def function_7(x, y):')
  assert len(ids) < len('def function_7(x, y):')  # merges learned
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == 'def function_7(x, y):'
  # The same file loads from its directory too.
  assert tokenizer_lib.load_tokenizer(os.path.dirname(bpe_path)).encode('def').tolist() == tok.encode('def').tolist()


def test_trained_bpe_file_is_byte_level(bpe_path):
  spec = json.load(open(bpe_path))
  assert spec['pre_tokenizer']['type'] == 'ByteLevel' and spec['decoder']['type'] == 'ByteLevel'
  assert [t['content'] for t in spec['added_tokens']] == ['<pad>', '<s>', '</s>', '<fim_prefix>',
                                                          '<fim_suffix>', '<fim_middle>']


def test_named_specials_and_missing_specials(bpe_path):
  tok = tokenizer_lib.HFTokenizer(bpe_path, bos_token='</s>', eos_token='<s>', pad_token='</s>')
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 2)
  with pytest.raises(ValueError, match=r"bos token '<\|begin\|>' is not in the vocabulary"):
    tokenizer_lib.load_tokenizer(bpe_path, bos_token='<|begin|>')


def _word_level_tokenizer(path, specials):
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({'a': 0, 'b': 1, '[UNK]': 2}, unk_token='[UNK]'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(specials)
  tok.save(str(path))
  return str(path)


def test_default_specials_deepseek_names_and_pad_fallback(tmp_path):
  path = _word_level_tokenizer(tmp_path / 'ds.json', ['<｜begin▁of▁sentence｜>', '<｜end▁of▁sentence｜>'])
  tok = tokenizer_lib.load_tokenizer(path)
  assert tok.bos_token == '<｜begin▁of▁sentence｜>' and tok.bos_id == 3
  assert tok.eos_token == '<｜end▁of▁sentence｜>' and tok.eos_id == 4
  assert tok.pad_id == tok.eos_id  # no pad token: pad with eos (padding is masked)
  assert tok.token_byte_lengths().tolist() == [1, 1, 5, 0, 0]  # '[UNK]' counts as its text (not byte-level)


def test_no_default_specials_is_a_clear_error(tmp_path):
  path = _word_level_tokenizer(tmp_path / 'none.json', ['<start>'])
  with pytest.raises(ValueError, match='no bos token found .* bos_token='):
    tokenizer_lib.load_tokenizer(path)
  assert tokenizer_lib.load_tokenizer(path, bos_token='<start>', eos_token='<start>').bos_id == 3


def test_missing_tokenizer_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing.json'):
    tokenizer_lib.load_tokenizer(str(tmp_path / 'missing.json'))
  with pytest.raises(FileNotFoundError, match='missing.json'):
    tokenizer_lib.HFTokenizer(tmp_path / 'missing.json')


def test_train_bpe_rejects_tiny_vocab(tmp_path):
  with pytest.raises(ValueError, match='at least 262'):
    tokenizer_lib.train_bpe(['abc'], 100, tmp_path / 't.json')


def test_cli_trains_on_the_train_split(corpus_dir, tmp_path, capsys):
  root, expected = corpus_dir
  out = tmp_path / 'out' / 'tokenizer.json'
  tokenizer_lib.main([f'--source={root}', '--vocab_size=300', f'--out={out}', '--validation_fraction=0.2'])
  assert 'documents' in capsys.readouterr().out
  tok = tokenizer_lib.load_tokenizer(str(out))
  assert tok.vocab_size <= 300
  for text in expected.values():
    assert tok.decode(tok.encode(text)) == text
