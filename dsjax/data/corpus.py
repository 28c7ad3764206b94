"""Document sources: the embedded stdlib corpus, text files and directories, JSONL, ArrayRecord; the train/validation
split.

A source lists its documents up front (names and where to read them) and reads each one lazily, so it is a grain
random-access data source (`__len__` / `__getitem__`) that can be sliced, shuffled and read from several threads.

Document names are stable across machines: a path relative to the source root with '/' separators (`json/decoder.py`),
`file.jsonl:LINENO` (1-based) or `file.array_record:INDEX` (0-based). The split is chosen per document by a hash of that name (see `is_validation`), so
every process and every run agrees on it without coordination.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import grain

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
  """Where a document lives: the whole file at `path`, the JSON line starting at byte `offset` of `path`, or record
  `offset` of the ArrayRecord file `path`. `size` is its length in bytes (an estimate of its token count for mixture
  weights); `field` the JSON field holding the text."""
  name: str
  path: str
  offset: int = -1  # -1: whole file; >= 0: byte offset of a JSONL line / index of an ArrayRecord record
  size: int = 0
  field: str = 'text'
  array_record: bool = False


class _ArrayRecordReaders:
  """One grain ArrayRecordDataSource per file, opened on first use (thread-safe; readers are shared by threads)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._sources: dict[str, Any] = {}

  def __call__(self, path: str) -> Any:
    with self._lock:
      if path not in self._sources:
        self._sources[path] = grain.sources.ArrayRecordDataSource([path])
      return self._sources[path]

  def __getstate__(self):  # open readers do not pickle; a copy reopens them
    return {}

  def __setstate__(self, _):
    self.__init__()


def _record_text(name: str, raw: bytes, field: str, plain_text_ok: bool) -> str:
  """The text of a JSONL line or ArrayRecord record: `record[field]` of a JSON object. With `plain_text_ok`
  (ArrayRecord), a record that is not a JSON object is the text itself."""
  line = raw.decode('utf-8', errors='replace')
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    if plain_text_ok:
      return line
    raise ValueError(f'{name}: not valid JSON ({e})') from None
  if not isinstance(record, dict):
    if plain_text_ok:
      return line
    raise ValueError(f'{name}: not a JSON object (set data.jsonl_field to the field holding the text)')
  if field not in record:
    raise ValueError(f'{name}: no field {field!r} in this JSON record (set data.jsonl_field)')
  text = record[field]
  if not isinstance(text, str):
    raise ValueError(f'{name}: field {field!r} is a {type(text).__name__}, not a string')
  return text


class DocumentSource(Sequence):
  """A random-access list of documents read lazily from disk; `source[i]` -> `Document`.

  Thread-safe (every read opens its own file handle), so grain may read it from several threads.
  """

  def __init__(self, refs: Sequence[_Ref], *, description: str, readers: _ArrayRecordReaders | None = None):
    self._refs = tuple(refs)
    self.description = description
    self._readers = readers or _ArrayRecordReaders()

  def __len__(self) -> int:
    return len(self._refs)

  def __getitem__(self, index: int) -> Document:  # type: ignore[override]
    ref = self._refs[index]
    if ref.array_record:
      return Document(ref.name, _record_text(ref.name, self._readers(ref.path)[ref.offset], ref.field, True))
    if ref.offset < 0:
      with open(ref.path, 'rb') as f:
        return Document(ref.name, f.read().decode('utf-8', errors='replace'))
    with open(ref.path, 'rb') as f:
      f.seek(ref.offset)
      line = f.readline()
    return Document(ref.name, _record_text(ref.name, line, ref.field, False))

  def __iter__(self) -> Iterator[Document]:
    for i in range(len(self)):
      yield self[i]

  @property
  def names(self) -> list[str]:
    """The document names, in source order."""
    return [r.name for r in self._refs]

  @property
  def sizes(self) -> list[int]:
    """The documents' sizes in bytes (JSON lines and ArrayRecord records: the whole record), in source order."""
    return [r.size for r in self._refs]

  def labels(self, by: str) -> list[str]:
    """Each document's class for class-balanced sampling: by 'extension' (of the name, '' if none), 'directory'
    (the first path component, '' for top-level files) or any other value: that JSON field of a JSONL/ArrayRecord
    record (read from every record; a missing field is a ValueError naming the document)."""
    if by == 'extension':
      return [os.path.splitext(r.name.rsplit(':', 1)[0] if r.offset >= 0 else r.name)[1].lstrip('.')
              for r in self._refs]
    if by == 'directory':
      return [r.name.split('/', 1)[0] if '/' in r.name else '' for r in self._refs]
    labels = []
    for ref in self._refs:
      if ref.offset < 0 and not ref.array_record:
        raise ValueError(f'{ref.name}: a plain text file has no field {by!r} to balance by (use extension or '
                         'directory)')
      if ref.array_record:
        raw = self._readers(ref.path)[ref.offset]
      else:
        with open(ref.path, 'rb') as f:
          f.seek(ref.offset)
          raw = f.readline()
      try:
        record = json.loads(raw)
      except json.JSONDecodeError:
        record = None
      if not isinstance(record, dict) or by not in record:
        raise ValueError(f'{ref.name}: no field {by!r} to balance by')
      labels.append(str(record[by]))
    return labels

  def fingerprint(self) -> str:
    """A hash of what the documents are: every name, location and size, and the modification time of every file
    they live in. Caches of per-document results (dedup, scrub counts) are keyed by it."""
    h = hashlib.sha256()
    for r in self._refs:
      h.update(f'{r.name}\0{r.path}\0{r.offset}\0{r.size}\0{r.field}\n'.encode('utf-8', errors='replace'))
    for path in sorted({r.path for r in self._refs}):
      h.update(f'{path}\0{os.stat(path).st_mtime_ns}\n'.encode('utf-8', errors='replace'))
    return h.hexdigest()

  def select(self, indices: Sequence[int], description: str) -> DocumentSource:
    """The sub-source of the documents at `indices` (in that order)."""
    return DocumentSource([self._refs[i] for i in indices], description=description, readers=self._readers)

  @staticmethod
  def concatenate(sources: Sequence[DocumentSource], description: str) -> DocumentSource:
    """All documents of `sources`, one after the other."""
    return DocumentSource([r for s in sources for r in s._refs], description=description)  # pylint: disable=protected-access

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
    size = os.path.getsize(path)
    if rel.endswith('.py') and size > 0:
      refs.append(_Ref(rel, path, size=size))
  return DocumentSource(refs, description=f'stdlib at {root}' + (' with tests' if include_tests else ''))


def list_directory(root: str) -> DocumentSource:
  """All text files below `root` (recursive, sorted by relative path; hidden, empty and binary files skipped)."""
  refs = [_Ref(rel, os.path.join(root, rel), size=os.path.getsize(os.path.join(root, rel)))
          for rel in _walk_files(root, frozenset({'__pycache__'})) if _is_text_file(os.path.join(root, rel))]
  return DocumentSource(refs, description=f'directory {root}')


def list_jsonl(path: str, field: str = 'text') -> DocumentSource:
  """One document per non-blank line of a JSONL file, named `basename:LINENO`; the text is `record[field]`.

  Listing scans the file once for line offsets and text sizes; errors in a line are raised when it is read.
  """
  base = os.path.basename(path)
  refs = []
  offset = 0
  with open(path, 'rb') as f:
    for lineno, line in enumerate(f, 1):
      if line.strip():
        refs.append(_Ref(f'{base}:{lineno}', path, offset, size=_text_size(line, field), field=field))
      offset += len(line)
  return DocumentSource(refs, description=f'jsonl {path} (field {field!r})')


def _text_size(raw: bytes, field: str) -> int:
  """The UTF-8 size of `record[field]` of a JSON record (the mixture's token estimate), else the record's size."""
  try:
    text = json.loads(raw).get(field)
  except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
    return len(raw)
  return len(text.encode('utf-8', errors='replace')) if isinstance(text, str) else len(raw)


def list_array_record(path: str, field: str = 'text') -> DocumentSource:
  """One document per record of an ArrayRecord file, named `basename:INDEX`: `record[field]` when the record is a
  JSON object (as a JSONL line), else the record as UTF-8 text. Listing reads every record once for its size."""
  readers = _ArrayRecordReaders()
  records = readers(path)
  base = os.path.basename(path)
  refs = [_Ref(f'{base}:{i}', path, i, size=_text_size(records[i], field), field=field, array_record=True)
          for i in range(len(records))]
  return DocumentSource(refs, description=f'array_record {path} (field {field!r})', readers=readers)


def list_documents(source: str, *, include_stdlib_tests: bool = False, jsonl_field: str = 'text') -> DocumentSource:
  """All documents of `source`: 'stdlib', a directory, a .jsonl or .array_record file, or any other single text file
  (.txt, .py...).

  Raises FileNotFoundError if the path does not exist and ValueError if the source holds no documents.
  """
  if source == 'stdlib':
    docs = list_stdlib(include_stdlib_tests)
  elif not os.path.exists(source):
    raise FileNotFoundError(f"data source {source!r} does not exist (data.source must be 'stdlib', a directory, "
                            'a .txt/.py file, a .jsonl or an .array_record file)')
  elif os.path.isdir(source):
    docs = list_directory(source)
  elif source.endswith('.jsonl'):
    docs = list_jsonl(source, jsonl_field)
  elif source.endswith('.array_record'):
    docs = list_array_record(source, jsonl_field)
  else:
    docs = DocumentSource([_Ref(os.path.basename(source), source, size=os.path.getsize(source))],
                          description=f'file {source}')
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
