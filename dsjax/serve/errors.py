"""Errors answered in OpenAI's JSON shape."""
from __future__ import annotations

import json
from typing import Any

from fastapi import responses
import pydantic


class APIError(Exception):
  """An error answered in OpenAI's shape."""

  def __init__(self, status: int, message: str, *, type: str = 'invalid_request_error', param: str | None = None,
               code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


class ASCIIJSONResponse(responses.JSONResponse):
  """JSON escaped to ASCII: an error message quoting client text (even a lone surrogate) always encodes."""

  def render(self, content: Any) -> bytes:
    return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(',', ':')).encode('ascii')


def error_response(status: int, message: str, type: str = 'invalid_request_error', param: str | None = None,
                   code: str | None = None) -> responses.JSONResponse:
  return ASCIIJSONResponse({'error': dict(message=message, type=type, param=param, code=code)}, status)


def validation_error(e: pydantic.ValidationError) -> APIError:
  """pydantic's first error as a 400 naming the field: the message has its path and pydantic's text
  (`messages[0].role: Input should be 'system', ...`); the param is the field up to its first list index
  (`messages`), or for a key the object does not take, that object (`retrieval`)."""
  error = e.errors(include_url=False)[0]
  path = ''.join(f'[{k}]' if isinstance(k, int) else f'.{k}' for k in error['loc']).lstrip('.')
  field = error['loc'][:-1] if error['type'] == 'extra_forbidden' else error['loc']
  named = []
  for k in field:
    if not isinstance(k, str):
      break
    named.append(k)
  return APIError(400, f'{path}: {error["msg"]}' if path else error['msg'], param='.'.join(named) or None)
