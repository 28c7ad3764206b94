"""Tokenizers: a byte-level one (no files) and Hugging Face `tokenizer.json` files through the `tokenizers` library.

Both follow the `Tokenizer` protocol. `train_bpe` trains a byte-level BPE; the CLI trains one on a data source:

  python -m dsjax.data.tokenizer --source=stdlib --vocab_size=4096 --out=tokenizer.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsjax.data import corpus

# Special-token names tried in order when HFTokenizer is not told which to use (DeepSeek-Coder's first).
DEFAULT_BOS_TOKENS = ('<｜begin▁of▁sentence｜>', '<s>', '<|begin_of_text|>', '<bos>', '<|endoftext|>')
DEFAULT_EOS_TOKENS = ('<｜end▁of▁sentence｜>', '</s>', '<|end_of_text|>', '<eos>', '<|endoftext|>')
DEFAULT_PAD_TOKENS = ('<pad>', '<|pad|>', '<｜▁pad▁｜>', '[PAD]')  # none found: pad = eos (padding is masked anyway)
# Fill-in-the-middle sentinels (prefix, suffix, middle), looked up by name: DeepSeek-Coder's, then StarCoder's (the
# names train_bpe adds). DeepSeek-Coder writes <fim_begin> prefix <fim_hole> suffix <fim_end> middle.
FIM_TOKEN_NAMES = (('<｜fim▁begin｜>', '<｜fim▁hole｜>', '<｜fim▁end｜>'), ('<fim_prefix>', '<fim_suffix>', '<fim_middle>'))
_BYTE_FALLBACK = re.compile(r'<0x[0-9A-Fa-f]{2}>')


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline and the trainer need from a tokenizer."""
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  fim_ids: tuple[int, int, int] | None  # (prefix, suffix, middle) sentinels; None: no fill-in-the-middle tokens

  def encode(self, text: str) -> np.ndarray:
    """text -> int32 ids [num_tokens], without bos/eos."""
    ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """ids -> text; special ids are dropped and invalid UTF-8 is replaced, never an error."""
    ...

  def token_byte_lengths(self) -> np.ndarray:
    """int32 [vocab_size]: how many UTF-8 bytes each token stands for (0 for specials), for bits per byte."""
    ...


class ByteTokenizer:
  """UTF-8 bytes as tokens: ids 0..255 are the bytes, 256 = pad, 257 = bos, 258 = eos, 259..261 = the
  fill-in-the-middle sentinels prefix, suffix, middle; vocab_size 262."""
  vocab_size = 262
  pad_id = 256
  bos_id = 257
  eos_id = 258
  fim_ids = (259, 260, 261)

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode('utf-8', errors='replace')

  def token_byte_lengths(self) -> np.ndarray:
    lengths = np.zeros(self.vocab_size, np.int32)
    lengths[:256] = 1
    return lengths

  def __repr__(self) -> str:
    return 'ByteTokenizer()'


def _mentions_byte_level(node: Any) -> bool:
  """Whether a tokenizer.json component (decoder / pre_tokenizer, possibly a Sequence) is or holds ByteLevel."""
  if isinstance(node, dict):
    return node.get('type') == 'ByteLevel' or any(_mentions_byte_level(v) for v in node.values())
  if isinstance(node, list):
    return any(_mentions_byte_level(v) for v in node)
  return False


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (e.g. DeepSeek-Coder's, or one from `train_bpe`) via the `tokenizers` library.

  `bos_token` / `eos_token` / `pad_token`: names of the special tokens; None picks the first of the DEFAULT_*_TOKENS
  present (pad falls back to eos). A named token that is missing raises ValueError. `encode` never adds specials and,
  with `encode_special_tokens=True` (default), treats special-token text inside a document as ordinary text, so only
  the pipeline places bos/eos.
  """

  def __init__(self, path: str | os.PathLike, *, bos_token: str | None = None, eos_token: str | None = None,
               pad_token: str | None = None, encode_special_tokens: bool = True):
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'tokenizer file not found: {path!r}')
    self.path = path
    self._tok = tokenizers.Tokenizer.from_file(path)
    self._tok.encode_special_tokens = encode_special_tokens
    self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
    self.bos_token = self._find_special('bos', bos_token, DEFAULT_BOS_TOKENS)
    self.eos_token = self._find_special('eos', eos_token, DEFAULT_EOS_TOKENS)
    if pad_token is None and not any(self._tok.token_to_id(t) is not None for t in DEFAULT_PAD_TOKENS):
      pad_token = self.eos_token
    self.pad_token = self._find_special('pad', pad_token, DEFAULT_PAD_TOKENS)
    self.bos_id = self._tok.token_to_id(self.bos_token)
    self.eos_id = self._tok.token_to_id(self.eos_token)
    self.pad_id = self._tok.token_to_id(self.pad_token)
    self.fim_ids = None
    for names in FIM_TOKEN_NAMES:
      ids = tuple(self._tok.token_to_id(n) for n in names)
      if all(i is not None for i in ids):
        self.fim_ids = ids
        break

  def _find_special(self, role: str, name: str | None, candidates: Sequence[str]) -> str:
    if name is not None:
      if self._tok.token_to_id(name) is None:
        raise ValueError(f'{role} token {name!r} is not in the vocabulary of {self.path!r}')
      return name
    for cand in candidates:
      if self._tok.token_to_id(cand) is not None:
        return cand
    raise ValueError(f'no {role} token found in {self.path!r}: tried {list(candidates)}; pass {role}_token=...')

  def encode(self, text: str) -> np.ndarray:
    # encode_batch_fast releases the GIL (plain `encode` does not), so grain's read threads tokenize in parallel.
    return np.asarray(self._tok.encode_batch_fast([text], add_special_tokens=False)[0].ids, dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < self.vocab_size]
    return self._tok.decode(ids, skip_special_tokens=True)

  def token_byte_lengths(self) -> np.ndarray:
    """Byte-level vocabularies: one byte per character of the token string (GPT-2 byte alphabet); byte-fallback
    tokens `<0xNN>`: 1; otherwise the UTF-8 length of the token with '▁' read as a space. Added tokens: 0 if special,
    else the UTF-8 length of their content."""
    spec = json.loads(self._tok.to_str())
    byte_level = _mentions_byte_level(spec.get('decoder')) or _mentions_byte_level(spec.get('pre_tokenizer'))
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    lengths = np.zeros(self.vocab_size, np.int32)
    for token, i in self._tok.get_vocab(with_added_tokens=False).items():
      if byte_level and all(c in alphabet for c in token):
        lengths[i] = len(token)
      elif _BYTE_FALLBACK.fullmatch(token):
        lengths[i] = 1
      else:
        lengths[i] = len(token.replace('▁', ' ').encode('utf-8'))
    for i, added in self._tok.get_added_tokens_decoder().items():
      lengths[i] = 0 if added.special else len(added.content.encode('utf-8'))
    return lengths

  def __repr__(self) -> str:
    return f'HFTokenizer({self.path!r}, vocab_size={self.vocab_size})'


def load_tokenizer(spec: str, **kwargs: Any) -> Tokenizer:
  """'byte' -> ByteTokenizer; a path to a tokenizer.json (or a directory holding one) -> HFTokenizer(path, **kwargs)."""
  if spec == 'byte':
    return ByteTokenizer()
  path = os.path.join(spec, 'tokenizer.json') if os.path.isdir(spec) else spec
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer {spec!r} not found: data.tokenizer must be 'byte' or a path to a "
                            'tokenizer.json file')
  return HFTokenizer(path, **kwargs)


def from_config(data_cfg: Any) -> Tokenizer:
  """The tokenizer of a `data` config section (spec plus optional special-token names)."""
  names = {f'{role}_token': data_cfg.get(f'{role}_token') or None for role in ('bos', 'eos', 'pad')}
  return load_tokenizer(data_cfg.tokenizer, **({} if data_cfg.tokenizer == 'byte' else names))


def token_bytes_table(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
  """int32 [vocab_size]: UTF-8 bytes per token id (0 for specials and the padded ids beyond the tokenizer), so bits
  per byte compare across tokenizers."""
  if vocab_size < tokenizer.vocab_size:
    raise ValueError(f'model vocab_size={vocab_size} is smaller than the tokenizer\'s {tokenizer.vocab_size} ids')
  table = np.zeros((vocab_size,), np.int32)
  table[:tokenizer.vocab_size] = tokenizer.token_byte_lengths()
  return table


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike, *, pad_token: str = '<pad>',
              bos_token: str = '<s>', eos_token: str = '</s>', min_frequency: int = 2,
              show_progress: bool = False) -> HFTokenizer:
  """Trains a byte-level BPE (ByteLevel pre-tokenizer and decoder, no prefix space, all 256 bytes in the base
  alphabet, specials pad/bos/eos with ids 0/1/2 and the fill-in-the-middle sentinels <fim_prefix>/<fim_suffix>/
  <fim_middle> with ids 3/4/5) on `texts`, saves it to `out_path` and returns it loaded."""
  fim_tokens = list(FIM_TOKEN_NAMES[1])
  num_base = 3 + len(fim_tokens) + len(pre_tokenizers.ByteLevel.alphabet())
  if vocab_size < num_base:
    raise ValueError(f'vocab_size must be at least {num_base} (6 specials + 256 bytes), got {vocab_size}')
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
                                special_tokens=[pad_token, bos_token, eos_token] + fim_tokens,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  out_path = os.fspath(out_path)
  if os.path.dirname(out_path):
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
  tok.save(out_path)
  return HFTokenizer(out_path, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)


def main(argv: Sequence[str] | None = None) -> None:
  """CLI: train a byte-level BPE on the train split of a data source and write tokenizer.json.

  argparse rather than absl flags so that importing this module defines no global flags.
  """
  p = argparse.ArgumentParser(prog='python -m dsjax.data.tokenizer', description=main.__doc__)
  p.add_argument('--source', default='stdlib', help="'stdlib', a directory, a .txt/.py or a .jsonl file")
  p.add_argument('--include_stdlib_tests', action='store_true')
  p.add_argument('--jsonl_field', default='text')
  p.add_argument('--validation_fraction', type=float, default=0.05, help='as data.validation_fraction')
  p.add_argument('--vocab_size', type=int, default=4096)
  p.add_argument('--min_frequency', type=int, default=2)
  p.add_argument('--out', required=True, help='path of the tokenizer.json to write')
  args = p.parse_args(argv)
  docs = corpus.split_documents(
      corpus.list_documents(args.source, include_stdlib_tests=args.include_stdlib_tests,
                            jsonl_field=args.jsonl_field), 'train', args.validation_fraction)
  tok = train_bpe((d.text for d in docs), args.vocab_size, args.out, min_frequency=args.min_frequency,
                  show_progress=sys.stderr.isatty())
  print(f'trained {tok.vocab_size}-token byte-level BPE on {len(docs)} documents ({docs.description}) -> {args.out}')


if __name__ == '__main__':
  main()
