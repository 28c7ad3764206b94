"""Errors answered in OpenAI's JSON shape."""
from __future__ import annotations

import json
from typing import Any

from fastapi import responses


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
