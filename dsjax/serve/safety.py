"""A configurable output filter for the server's responses (off by default; serve.py --safety_config=FILE.json).

Three checks, any combination: a blocklist of words/phrases, regular expressions, and a classifier hook. On a hit the
response is refused (the text already released, then the refusal message; finish_reason 'content_filter', as
OpenAI's filter reports) or, for the blocklist and patterns, the matched span is redacted and the response goes on.

`OutputFilter` sees the text incrementally (a stream) and never releases text that may still turn out to be (part of)
a match. For the blocklist this is exact: it holds back the longest tail that could be the start of a blocked phrase.
A regular expression can match text of any length, so with `patterns` it also holds back the last `max_match_chars`
characters: streams lag by up to that many characters, and a match longer than that (look-ahead included) may be
partly released before it is seen. With a classifier, text is released only once the classifier has passed it: at
each sentence end or newline, at least every `classifier_chars` characters, and at the end.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from typing import Any, Callable

from absl import logging

KINDS = ('chat', 'completion')  # the endpoints a config can apply to (api.py's request kinds)
ACTIONS = ('refuse', 'redact')
DEFAULT_REFUSAL = "I'm sorry, but I can't continue with this response."
_SENTENCE_END = re.compile(r'[.!?](?=\s)|\n')


@dataclasses.dataclass(frozen=True)
class SafetyConfig:
  """What the output filter blocks and how; invalid settings raise ValueError at construction.

  blocklist: words/phrases, matched literally, case-insensitively and as whole words (`class` does not match in
    `classify` or `subclass`).
  patterns: Python regular expressions, matched as written (`(?i)` for case-insensitive).
  classifier: `package.module:function`, a hook fn(text: str) -> float | bool called on the text generated so far;
    a score >= classifier_threshold (or True) flags it, and a flag always refuses. A hook that raises or returns
    something else flags too (fail closed). It should be fast: it runs in the request's path.
  action: 'refuse' (stop; the text released before the hit, then refusal_message) or 'redact' (replace each
    blocklist/pattern match by `redaction` and go on).
  apply_to: which endpoints are filtered: 'chat' (/v1/chat/completions) and/or 'completion' (/v1/completions).
  max_match_chars: with patterns, the characters held back at the end of a stream (the longest match expected).
  classifier_chars: with a classifier, the most characters generated between two classifier calls.
  """
  blocklist: tuple[str, ...] = ()
  patterns: tuple[str, ...] = ()
  classifier: str = ''
  classifier_threshold: float = 0.5
  classifier_chars: int = 256
  action: str = 'refuse'
  refusal_message: str = DEFAULT_REFUSAL
  redaction: str = '[filtered]'
  apply_to: tuple[str, ...] = ('chat',)
  max_match_chars: int = 64
  # Derived at construction: the compiled matchers and the resolved hook.
  matchers: tuple[tuple[str, re.Pattern], ...] = dataclasses.field(init=False, repr=False, compare=False)
  prefix_matcher: re.Pattern | None = dataclasses.field(init=False, repr=False, compare=False)
  hook: Callable[[str], Any] | None = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    for name in ('blocklist', 'patterns', 'apply_to'):
      value = getattr(self, name)
      if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f'safety config: {name} must be a list of strings, got {value!r}')
      object.__setattr__(self, name, tuple(value))
    for name in ('classifier', 'action', 'refusal_message', 'redaction'):
      if not isinstance(getattr(self, name), str):
        raise ValueError(f'safety config: {name} must be a string, got {getattr(self, name)!r}')
    for name in ('classifier_chars', 'max_match_chars'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'safety config: {name} must be an integer >= 1, got {value!r}')
    threshold = self.classifier_threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
      raise ValueError(f'safety config: classifier_threshold must be a number in (0, 1], got {threshold!r}')
    if self.action not in ACTIONS:
      raise ValueError(f'safety config: action must be one of {", ".join(ACTIONS)}, got {self.action!r}')
    if not set(self.apply_to) <= set(KINDS):
      raise ValueError(f'safety config: apply_to entries must be among {", ".join(KINDS)}, got {self.apply_to!r}')
    phrases = tuple(p.strip() for p in self.blocklist)
    if not all(phrases):
      raise ValueError('safety config: blocklist entries must be non-empty')
    matchers = []
    if phrases:
      matchers.append(('blocklist', re.compile('|'.join(_whole_word(p) for p in sorted(phrases, key=len,
                                                                                         reverse=True)), re.I)))
    for pattern in self.patterns:
      try:
        compiled = re.compile(pattern)
      except re.error as e:
        raise ValueError(f'safety config: bad regular expression {pattern!r} in patterns: {e}') from None
      if compiled.search('') is not None:
        raise ValueError(f'safety config: the pattern {pattern!r} matches the empty string')
      matchers.append(('pattern', compiled))
    object.__setattr__(self, 'matchers', tuple(matchers))
    # Tails of the text that may still grow into a blocked phrase: any prefix of one, up to the end of the text.
    object.__setattr__(self, 'prefix_matcher', re.compile(
        '(?:' + '|'.join(_prefixes(p) for p in phrases) + r')\Z', re.I) if phrases else None)
    object.__setattr__(self, 'hook', _import_hook(self.classifier) if self.classifier else None)

  def applies_to(self, kind: str) -> bool:
    """Whether responses of `kind` ('chat' or 'completion') are filtered."""
    return kind in self.apply_to


def _whole_word(phrase: str) -> str:
  """`phrase` as a regex that does not match inside a longer word (boundaries only where it has word characters)."""
  left = r'(?<!\w)' if re.match(r'\w', phrase) else ''
  right = r'(?!\w)' if re.search(r'\w\Z', phrase) else ''
  return left + re.escape(phrase) + right


def _prefixes(phrase: str) -> str:
  """A regex matching any non-empty prefix of `phrase` (whole phrase included) where the phrase could start."""
  body = ''
  for char in reversed(phrase[1:]):
    body = f'(?:{re.escape(char)}{body})?'
  return (r'(?<!\w)' if re.match(r'\w', phrase) else '') + re.escape(phrase[0]) + body


def _import_hook(path: str) -> Callable[[str], Any]:
  module_name, _, attribute = path.partition(':')
  if not module_name or not attribute:
    raise ValueError(f'safety config: classifier must be "package.module:function", got {path!r}')
  try:
    hook: Any = importlib.import_module(module_name)
    for part in attribute.split('.'):
      hook = getattr(hook, part)
  except Exception as e:  # pylint: disable=broad-except  (whatever importing the hook's module raises)
    raise ValueError(f'safety config: cannot import the classifier {path!r}: {type(e).__name__}: {e}') from None
  if not callable(hook):
    raise ValueError(f'safety config: the classifier {path!r} is not callable')
  return hook


def load_safety_config(path: str) -> SafetyConfig:
  """A SafetyConfig from a JSON object whose keys are its fields. FileNotFoundError / ValueError naming the
  problem (missing file, bad JSON, unknown key, bad value)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'safety config {path} does not exist (or is not a file)')
  try:
    with open(path, encoding='utf-8') as f:
      raw = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'safety config {path} is not valid JSON: {e}') from None
  if not isinstance(raw, dict):
    raise ValueError(f'safety config {path} must be a JSON object')
  known = [f.name for f in dataclasses.fields(SafetyConfig) if f.init]
  for key in raw:
    if key not in known:
      raise ValueError(f'safety config {path}: unknown key {key!r} (known: {", ".join(known)})')
  try:
    return SafetyConfig(**raw)
  except ValueError as e:
    raise ValueError(f'{e} (in {path})') from None


def _search(regex: re.Pattern, text: str, pos: int) -> re.Match | None:
  """The first non-empty match of `regex` in text[pos:] (look-behind sees text before pos)."""
  while pos <= len(text):
    match = regex.search(text, pos)
    if match is None or match.end() > match.start():
      return match
    pos = match.start() + 1
  return None


class OutputFilter:
  """Filters one response incrementally: `push(piece)` -> the text safe to send now, `finish()` -> the rest.

  `text` is everything returned so far. `flagged` says something matched (a redaction or a refusal), `refused`
  that the response was stopped, `reason` the category of the first hit ('blocklist' | 'pattern' | 'classifier');
  the matched text itself is never recorded (nor logged: the log says `name`, the action and the category). After
  a refusal everything pushed is dropped.
  """

  def __init__(self, config: SafetyConfig, name: str = ''):
    self.config, self.name = config, name
    self.text = ''
    self.flagged = self.refused = False
    self.reason: str | None = None
    self.redactions = 0
    self._raw = ''  # everything pushed
    self._pos = 0  # raw[:pos] is decided (released or redacted)
    self._checked = 0  # raw[:checked] passed the classifier
    self._finished = False

  def push(self, piece: str) -> str:
    if self.refused or self._finished:
      return ''
    self._raw += piece
    return self._emit(self._advance(final=False))

  def finish(self) -> str:
    if self.refused or self._finished:
      return ''
    out = self._advance(final=True)
    self._finished = True
    return self._emit(out)

  def _emit(self, out: str) -> str:
    self.text += out
    return out

  def _hit(self, reason: str, action: str) -> None:
    if not self.flagged:
      self.flagged, self.reason = True, reason
    if action == 'refuse' or self.redactions == 0:
      logging.warning('content filter: %s %s (%s)', 'refused' if action == 'refuse' else 'redacting',
                      self.name or 'a response', reason)

  def _refuse(self, reason: str, released: str) -> str:
    """`released` (text before the hit) and the refusal message, separated by a blank line when both are there."""
    self._hit(reason, 'refuse')
    self.refused, self._pos = True, len(self._raw)
    message = self.config.refusal_message
    return released + ('\n\n' if (self.text or released) and message else '') + message

  def _classify(self, final: bool) -> bool:
    """Runs the classifier on the text up to the next checkpoint when one is due; True: flagged."""
    raw, end = self._raw, self._checked
    if final:
      end = len(raw)
    else:
      for match in _SENTENCE_END.finditer(raw, self._checked):
        end = match.end()
      if end == self._checked and len(raw) - self._checked >= self.config.classifier_chars:
        end = len(raw)
    if end <= self._checked:
      return False
    self._checked = end
    try:
      score = self.config.hook(raw[:end])
      return not float(score) < self.config.classifier_threshold  # NaN flags too
    except Exception as e:  # pylint: disable=broad-except
      logging.error('safety classifier %s failed (%s: %s); treating the text as flagged', self.config.classifier,
                    type(e).__name__, e)
      return True

  def _advance(self, final: bool) -> str:
    """Decides raw[pos:] up to what is known to be safe (everything when final); returns the text to release."""
    raw, config = self._raw, self.config
    if config.hook is not None and self._classify(final):
      return self._refuse('classifier', '')
    limit = len(raw)
    if not final:
      hold = config.max_match_chars if config.patterns else 0
      if config.prefix_matcher is not None:
        tail = config.prefix_matcher.search(raw, self._pos)
        hold = max(hold, len(raw) - tail.start() if tail else 0)
      limit -= hold
      if config.hook is not None:
        limit = min(limit, self._checked)
    out = []
    while self._pos < limit:
      found = [(m, reason) for reason, regex in config.matchers if (m := _search(regex, raw, self._pos))]
      match, reason = min(found, key=lambda f: f[0].start(), default=(None, None))
      # A match reaching the end of the text may still grow (or vanish) with more text: decide it later.
      if match is None or match.start() >= limit or (not final and match.end() >= len(raw)):
        end = limit if match is None or match.start() >= limit else match.start()
        out.append(raw[self._pos:end])
        self._pos = end
        break
      out.append(raw[self._pos:match.start()])
      if config.action == 'refuse':
        return self._refuse(reason, ''.join(out))
      self._hit(reason, 'redact')
      self.redactions += 1
      out.append(config.redaction)
      self._pos = match.end()
    return ''.join(out)
