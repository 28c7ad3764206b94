"""Retrieval-augmented prompts for code completion (RepoCoder, Zhang et al. 2023; ReACC, Lu et al. 2022).

The query for a completion prompt is its last few lines (the function header and docstring the model is about to
complete, RepoCoder's sliding window). The retrieved snippets are prepended to the prompt as code, each under a
`# Retrieved from NAME:` comment, and the prompt follows unchanged, so the completion continues it as before. The
best hit is placed last, next to the prompt: it is the one left when a context is cut from the left.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dsjax.retrieval.index import Hit
from dsjax.retrieval.snippets import cap

DEFAULT_QUERY_LINES = 10
STYLES = ('code', 'comment')


def build_query(prompt: str, num_lines: int = DEFAULT_QUERY_LINES) -> str:
  """The last `num_lines` lines of `prompt` (trailing blank lines ignored)."""
  if num_lines < 1:
    raise ValueError(f'num_lines must be >= 1, got {num_lines}')
  return '\n'.join(prompt.rstrip().split('\n')[-num_lines:])


def _render(hit: Hit, style: str) -> tuple[str, str]:
  """(header, body) of one retrieved block."""
  header = f'# Retrieved from {" ".join(hit.name.split())}:\n'
  body = hit.text.rstrip('\n')
  if style == 'comment':
    body = '\n'.join(f'# {line}'.rstrip() for line in body.split('\n'))
  return header, body


def augment_prompt(prompt: str, hits: Sequence[Hit], max_chars: int, *, style: str = 'code') -> str:
  """`prompt` with the `hits` (best first) prepended, at most `max_chars` characters of them, best hit last.

  Each block is '# Retrieved from NAME:\\n' + the snippet ('code') or the snippet as '# ' comment lines ('comment')
  + a blank line. Hits are taken best first while they fit; the first that does not is cut at a line end (kept
  if any of it fits) and the rest are dropped. The result always ends with `prompt`, unchanged.
  """
  if style not in STYLES:
    raise ValueError(f'style must be one of {STYLES}, got {style!r}')
  blocks: list[str] = []
  room = max(0, int(max_chars))
  for hit in hits:
    header, body = _render(hit, style)
    block = f'{header}{body}\n\n'
    if len(block) <= room:
      blocks.append(block)
      room -= len(block)
      continue
    cut = cap(body, room - len(header) - 2) if room > len(header) + 2 else ''
    if cut.strip():
      blocks.append(f'{header}{cut}\n\n')
    break
  return ''.join(reversed(blocks)) + prompt


def _num_tokens(tokenizer: Any, text: str) -> int:
  return 1 + len(tokenizer.encode(text))  # with bos


def fit_augmented(prompt: str, hits: Sequence[Hit], tokenizer: Any, max_tokens: int, *,
                  max_chars: int | None = None, style: str = 'code') -> str:
  """`augment_prompt` with as much retrieved text (at most `max_chars`) as keeps [bos] + the augmented prompt
  within `max_tokens` tokens; `prompt` unchanged when it alone does not leave room."""
  if _num_tokens(tokenizer, prompt) >= max_tokens or not hits:
    return prompt
  chars = sum(len(''.join(_render(h, style))) + 2 for h in hits)
  chars = min(chars, max_chars) if max_chars is not None else chars
  while chars > 0:
    augmented = augment_prompt(prompt, hits, chars, style=style)
    excess = _num_tokens(tokenizer, augmented) - max_tokens
    if excess <= 0:
      return augmented
    context = len(augmented) - len(prompt)
    context_tokens = max(1, _num_tokens(tokenizer, augmented[:context]) - 1)
    chars = min(chars, context) - max(1, int(excess * max(1.0, context / context_tokens)))
  return prompt


def keep_last_lines(text: str, tokenizer: Any, max_tokens: int) -> str:
  """The longest suffix of `text` made of whole lines whose tokens number at most `max_tokens` (without bos); if
  even the last line is longer, its longest such character suffix."""
  if len(tokenizer.encode(text)) <= max_tokens:
    return text
  lines = text.splitlines(keepends=True)
  starts = [sum(len(line) for line in lines[:i]) for i in range(len(lines))]
  fits = lambda start: len(tokenizer.encode(text[start:])) <= max_tokens  # noqa: E731
  lo, hi = 1, len(starts)  # the first line index whose suffix fits lies in [lo, hi] (hi: none)
  while lo < hi:
    mid = (lo + hi) // 2
    if fits(starts[mid]):
      hi = mid
    else:
      lo = mid + 1
  if lo < len(starts):
    return text[starts[lo]:]
  lo, hi = starts[-1] + 1 if starts else 1, len(text)  # no whole line fits: cut inside the last one
  while lo < hi:
    mid = (lo + hi) // 2
    if fits(mid):
      hi = mid
    else:
      lo = mid + 1
  return text[lo:]
