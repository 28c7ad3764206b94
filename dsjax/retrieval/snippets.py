"""Cutting a code corpus into retrievable snippets.

A document that parses as Python gives one snippet per top-level function and class (decorators included), named
`file:qualname`; a class longer than `max_chars` gives one snippet per method instead (`file:Class.method`), since
its head alone would hold little of it. A document that does not parse, or parses but defines nothing (plain text,
a script), gives windows of `window_lines` lines named `file:Lstart-Lend` (1-based, inclusive). Every snippet's text
is capped at `max_chars` characters (cut at a line end where possible).
"""
from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterable

from dsjax.data.corpus import Document

DEFAULT_MAX_CHARS = 1500
DEFAULT_WINDOW_LINES = 30


@dataclasses.dataclass(frozen=True)
class Snippet:
  """A retrievable piece of code: `name` ('file:qualname' or 'file:Lstart-Lend') and its `text`."""
  name: str
  text: str


def cap(text: str, max_chars: int) -> str:
  """`text` cut to at most `max_chars` characters, at the last line end within the limit when there is one."""
  if len(text) <= max_chars:
    return text
  cut = text.rfind('\n', 0, max_chars + 1)
  return text[:cut] if cut > 0 else text[:max_chars]


def _span(node: ast.stmt) -> tuple[int, int]:
  """0-based [start, end) line range of a definition, decorators included."""
  start = min([node.lineno] + [d.lineno for d in getattr(node, 'decorator_list', [])])
  return start - 1, node.end_lineno or node.lineno


def python_snippets(text: str, file_name: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[Snippet] | None:
  """The top-level functions and classes of a Python source (see the module doc); None if it does not parse."""
  try:
    tree = ast.parse(text)
  except (SyntaxError, ValueError):
    return None
  lines = text.split('\n')
  found = []
  defs = (ast.FunctionDef, ast.AsyncFunctionDef)
  for node in tree.body:
    if not isinstance(node, (*defs, ast.ClassDef)):
      continue
    start, end = _span(node)
    body = '\n'.join(lines[start:end])
    methods = [item for item in node.body if isinstance(item, defs)] if isinstance(node, ast.ClassDef) else []
    if len(body) > max_chars and methods:
      for item in methods:
        s, e = _span(item)
        found.append(Snippet(f'{file_name}:{node.name}.{item.name}', cap('\n'.join(lines[s:e]), max_chars)))
    else:
      found.append(Snippet(f'{file_name}:{node.name}', cap(body, max_chars)))
  return found


def window_snippets(text: str, file_name: str, window_lines: int = DEFAULT_WINDOW_LINES,
                    max_chars: int = DEFAULT_MAX_CHARS) -> list[Snippet]:
  """Consecutive, non-overlapping windows of `window_lines` lines; blank windows are skipped."""
  if window_lines < 1:
    raise ValueError(f'window_lines must be >= 1, got {window_lines}')
  lines = text.split('\n')
  found = []
  for start in range(0, len(lines), window_lines):
    chunk = lines[start:start + window_lines]
    if any(line.strip() for line in chunk):
      found.append(Snippet(f'{file_name}:L{start + 1}-L{start + len(chunk)}', cap('\n'.join(chunk), max_chars)))
  return found


def document_snippets(doc: Document, *, max_chars: int = DEFAULT_MAX_CHARS,
                      window_lines: int = DEFAULT_WINDOW_LINES) -> list[Snippet]:
  """The snippets of one document: Python definitions, else line windows."""
  if max_chars < 1:
    raise ValueError(f'max_chars must be >= 1, got {max_chars}')
  found = python_snippets(doc.text, doc.name, max_chars)
  return found if found else window_snippets(doc.text, doc.name, window_lines, max_chars)


def corpus_snippets(docs: Iterable[Document], *, max_chars: int = DEFAULT_MAX_CHARS,
                    window_lines: int = DEFAULT_WINDOW_LINES, max_snippets: int | None = None) -> list[Snippet]:
  """The snippets of every document, in corpus order, at most `max_snippets` (None: all)."""
  found: list[Snippet] = []
  for doc in docs:
    found += document_snippets(doc, max_chars=max_chars, window_lines=window_lines)
    if max_snippets is not None and len(found) >= max_snippets:
      return found[:max_snippets]
  return found
