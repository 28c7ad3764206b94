"""What a request to the server may hold, as data: body size, JSON nesting, prompt and message sizes, stop strings,
and the time a request may take. Every violation is an APIError (4xx) naming the field, checked before any work.

The JSON checks are here because Python's json module parses NaN/Infinity (not JSON), recurses once per nesting
level (100,000 nested `[` raise RecursionError) and accepts lone surrogates (`"\\ud800"`), which no tokenizer or
UTF-8 response can encode.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import fastapi

from dsjax.serve.errors import APIError

_SURROGATE = re.compile('[\ud800-\udfff]')


@dataclasses.dataclass(frozen=True)
class Limits:
  """Server-wide request limits (serve.py flags of the same names). A 0 means "no limit of its own": the prompt
  tokens are then bounded by the context (max_len - 1) and a request's time by nothing."""
  max_body_bytes: int = 2 * 2**20  # 2 MiB: a 16k-token prompt is ~64 KB of JSON
  max_json_depth: int = 32  # chat bodies nest 4 deep (body > messages > message > content parts)
  max_prompt_chars: int = 1_000_000  # a prompt's characters, or all chat messages' together
  max_prompt_tokens: int = 0
  max_messages: int = 1000
  max_stop: int = 4  # as OpenAI
  max_stop_chars: int = 256  # each stop string (the text stream matches them at every token)
  request_timeout: float = 600.0  # seconds from arrival to the last token; 0: none

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f'{field.name} must be a number >= 0, got {value!r}')
    for name in ('max_body_bytes', 'max_json_depth', 'max_prompt_chars', 'max_messages', 'max_stop',
                 'max_stop_chars'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')

  def prompt_tokens(self, max_len: int) -> int:
    """The most prompt tokens a request may have with a context of `max_len`."""
    return min(self.max_prompt_tokens or max_len - 1, max_len - 1)


async def read_body(request: fastapi.Request, limits: Limits) -> bytes:
  """The raw body, read no further than max_body_bytes (413 beyond it, or at once for a larger Content-Length)."""
  too_large = APIError(413, f'the request body exceeds {limits.max_body_bytes} bytes (max_body_bytes)',
                       code='request_too_large')
  declared = request.headers.get('content-length')
  if declared is not None and declared.strip().isdigit() and int(declared) > limits.max_body_bytes:
    raise too_large
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limits.max_body_bytes:
      raise too_large
    chunks.append(chunk)
  return b''.join(chunks)


def _reject_constant(name: str) -> None:
  raise ValueError(f'{name} is not valid JSON')


def parse_json(raw: bytes, limits: Limits) -> Any:
  """The JSON value of `raw`: APIError(400) for invalid JSON (NaN and Infinity included), nesting deeper than
  max_json_depth, or a string (or key) holding a lone surrogate, with the path to it as the param."""
  try:
    value = json.loads(raw, parse_constant=_reject_constant)
  except RecursionError:
    raise APIError(400, f'the request body nests deeper than {limits.max_json_depth} levels (max_json_depth)',
                   code='too_deeply_nested') from None
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    raise APIError(400, f'the request body is not valid JSON: {e}') from None
  check_value(value, limits.max_json_depth)
  return value


def check_value(value: Any, max_depth: int) -> None:
  """Walks a parsed JSON value without recursion: APIError(400) past `max_depth` levels or at a string that is not
  encodable text (a lone surrogate), naming its path, e.g. `messages[1].content`."""
  stack = [(value, '', 1)]
  while stack:
    item, path, depth = stack.pop()
    if isinstance(item, (dict, list)) and depth > max_depth:
      raise APIError(400, f'the request body nests deeper than {max_depth} levels (max_json_depth) at '
                     f'{path or "the top"}', param=path or None, code='too_deeply_nested')
    if isinstance(item, dict):
      for key, child in item.items():
        child_path = f'{path}.{key}' if path else str(key)
        check_text(key, child_path)
        stack.append((child, child_path, depth + 1))
    elif isinstance(item, list):
      stack.extend((child, f'{path}[{i}]', depth + 1) for i, child in enumerate(item))
    elif isinstance(item, str):
      check_text(item, path)


def check_text(text: str, path: str) -> None:
  """APIError(400) naming `path` when `text` holds a lone surrogate (valid JSON, not encodable as UTF-8)."""
  if _SURROGATE.search(text):
    shown = path.encode('ascii', 'backslashreplace').decode()
    raise APIError(400, f'{shown} holds a lone surrogate (\\ud800-\\udfff), which is not encodable text',
                   param=shown, code='invalid_text')
