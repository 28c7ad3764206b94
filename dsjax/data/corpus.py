"""Document sources: the embedded stdlib corpus, text files and directories, JSONL; the train/validation split.

A source lists its documents up front (names and where to read them) and reads each one lazily, so it is a grain
random-access data source (`__len__` / `__getitem__`) that can be sliced, shuffled and read from several threads.

Document names are stable across machines: a path relative to the source root with '/' separators (`json/decoder.py`),
or `file.jsonl:LINENO` (1-based). The split is chosen per document by a hash of that name (see `is_validation`), so
every process and every run agrees on it without coordination.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

SPLITS = ('train', 'validation')
# Directories never listed; the second set only when stdlib tests are excluded (`test` is the regression-test
# package, the others are per-package test suites such as ctypes/test, lib2to3/tests, idlelib/idle_test).
_ALWAYS_SKIPPED_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__'})
_STDLIB_TEST_DIRS = frozenset({'test', 'tests', 'idle_test'})
_BINARY_SNIFF_BYTES = 8192


class Document(NamedTuple):
  """One document: a stable `name` and its decoded `text`."""
  name: str
  text: str


@dataclasses.dataclass(frozen=True)
class _Ref:
  """Where a document lives: the whole file at `path`, or the JSON line starting at byte `offset` of `path`."""
  name: str
  path: str
  offset: int = -1  # -1: whole file; >= 0: byte offset of a JSONL line


class DocumentSource(Sequence):
  """A random-access list of documents read lazily from disk; `source[i]` -> `Document`.

  Thread-safe (every read opens its own file handle), so grain may read it from several threads.
  """

  def __init__(self, refs: Sequence[_Ref], *, description: str, jsonl_field: str = 'text'):
    self._refs = tuple(refs)
    self.description = description
    self.jsonl_field = jsonl_field

  def __len__(self) -> int:
    return len(self._refs)

  def __getitem__(self, index: int) -> Document:  # type: ignore[override]
    ref = self._refs[index]
    if ref.offset < 0:
      with open(ref.path, 'rb') as f:
        return Document(ref.name, f.read().decode('utf-8', errors='replace'))
    with open(ref.path, 'rb') as f:
      f.seek(ref.offset)
      line = f.readline().decode('utf-8', errors='replace')
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{ref.name}: not valid JSON ({e})') from None
    if not isinstance(record, dict) or self.jsonl_field not in record:
      raise ValueError(f'{ref.name}: no field {self.jsonl_field!r} in this JSON line (set data.jsonl_field)')
    text = record[self.jsonl_field]
    if not isinstance(text, str):
      raise ValueError(f'{ref.name}: field {self.jsonl_field!r} is a {type(text).__name__}, not a string')
    return Document(ref.name, text)

  def __iter__(self) -> Iterator[Document]:
    for i in range(len(self)):
      yield self[i]

  @property
  def names(self) -> list[str]:
    """The document names, in source order."""
    return [r.name for r in self._refs]

  def select(self, indices: Sequence[int], description: str) -> DocumentSource:
    """The sub-source of the documents at `indices` (in that order)."""
    return DocumentSource([self._refs[i] for i in indices], description=description, jsonl_field=self.jsonl_field)

  def __repr__(self) -> str:
    return f'DocumentSource({self.description}, {len(self)} documents)'


def validation_hash(name: str) -> float:
  """A stable number in [0, 1) from a document name: the first 8 bytes of sha256(name) over 2**64.

  hashlib, not Python's `hash()`, which is salted per process.
  """
  return int.from_bytes(hashlib.sha256(name.encode('utf-8')).digest()[:8], 'big') / 2.0**64


def is_validation(name: str, validation_fraction: float) -> bool:
  """Whether the document `name` belongs to the validation split (`validation_hash(name) < validation_fraction`)."""
  return validation_hash(name) < validation_fraction


def stdlib_root() -> str:
  """The directory of the running Python's standard library sources."""
  return sysconfig.get_paths()['stdlib']


def _is_text_file(path: str) -> bool:
  """Non-empty and no NUL byte in the first 8 KiB (the usual binary-file heuristic, as in git and grep)."""
  try:
    with open(path, 'rb') as f:
      head = f.read(_BINARY_SNIFF_BYTES)
  except OSError:
    return False
  return bool(head) and b'\0' not in head


def _walk_files(root: str, skip_dirs: frozenset[str]) -> list[str]:
  """Relative '/'-separated paths of all files under `root`, sorted; hidden entries and `skip_dirs` are skipped."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith('.')]
    for fn in filenames:
      if not fn.startswith('.'):
        found.append(os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, '/'))
  return sorted(found)


def list_stdlib(include_tests: bool = False) -> DocumentSource:
  """The standard library's non-empty `.py` files, without site-packages / dist-packages and (unless `include_tests`)
  without the test packages (any directory named test, tests or idle_test)."""
  root = stdlib_root()
  if not os.path.isdir(root):
    raise FileNotFoundError(f'standard library sources not found at {root!r} (sysconfig stdlib path)')
  skip = _ALWAYS_SKIPPED_DIRS if include_tests else _ALWAYS_SKIPPED_DIRS | _STDLIB_TEST_DIRS
  refs = []
  for rel in _walk_files(root, skip):
    path = os.path.join(root, rel)
    if rel.endswith('.py') and os.path.getsize(path) > 0:
      refs.append(_Ref(rel, path))
  return DocumentSource(refs, description=f'stdlib at {root}' + (' with tests' if include_tests else ''))


def list_directory(root: str) -> DocumentSource:
  """All text files below `root` (recursive, sorted by relative path; hidden, empty and binary files skipped)."""
  refs = [_Ref(rel, os.path.join(root, rel)) for rel in _walk_files(root, frozenset({'__pycache__'}))
          if _is_text_file(os.path.join(root, rel))]
  return DocumentSource(refs, description=f'directory {root}')


def list_jsonl(path: str, field: str = 'text') -> DocumentSource:
  """One document per non-blank line of a JSONL file, named `basename:LINENO`; the text is `record[field]`.

  Listing scans the file once for line offsets; the JSON is parsed only when a document is read.
  """
  base = os.path.basename(path)
  refs = []
  offset = 0
  with open(path, 'rb') as f:
    for lineno, line in enumerate(f, 1):
      if line.strip():
        refs.append(_Ref(f'{base}:{lineno}', path, offset))
      offset += len(line)
  return DocumentSource(refs, description=f'jsonl {path} (field {field!r})', jsonl_field=field)


def list_documents(source: str, *, include_stdlib_tests: bool = False, jsonl_field: str = 'text') -> DocumentSource:
  """All documents of `source`: 'stdlib', a directory, a .jsonl file, or any other single text file (.txt, .py...).

  Raises FileNotFoundError if the path does not exist and ValueError if the source holds no documents.
  """
  if source == 'stdlib':
    docs = list_stdlib(include_stdlib_tests)
  elif not os.path.exists(source):
    raise FileNotFoundError(f"data source {source!r} does not exist (data.source must be 'stdlib', a directory, "
                            'a .txt/.py file or a .jsonl file)')
  elif os.path.isdir(source):
    docs = list_directory(source)
  elif source.endswith('.jsonl'):
    docs = list_jsonl(source, jsonl_field)
  else:
    docs = DocumentSource([_Ref(os.path.basename(source), source)], description=f'file {source}')
    if os.path.getsize(source) == 0:
      docs = DocumentSource([], description=f'file {source}')
  if len(docs) == 0:
    raise ValueError(f'data source {source!r} holds no documents ({docs.description})')
  return docs


def split_documents(docs: DocumentSource, split: str, validation_fraction: float) -> DocumentSource:
  """The documents of `docs` in `split` ('train' or 'validation'), in source order.

  Raises ValueError for an unknown split, a fraction outside [0, 1], or a split without documents.
  """
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  if not 0.0 <= validation_fraction <= 1.0:
    raise ValueError(f'data.validation_fraction must be in [0, 1], got {validation_fraction}')
  want_validation = split == 'validation'
  indices = [i for i, name in enumerate(docs.names) if is_validation(name, validation_fraction) == want_validation]
  if not indices:
    raise ValueError(f'the {split!r} split of {docs.description} has no documents ({len(docs)} documents in all, '
                     f'validation_fraction={validation_fraction})')
  return docs.select(indices, f'{docs.description}, {split} split')


def load_split(data_cfg: Any, split: str) -> DocumentSource:
  """The `split` documents of the source described by `data_cfg` (fields source, include_stdlib_tests, jsonl_field,
  validation_fraction)."""
  docs = list_documents(data_cfg.source, include_stdlib_tests=data_cfg.include_stdlib_tests,
                        jsonl_field=data_cfg.jsonl_field)
  return split_documents(docs, split, data_cfg.validation_fraction)
