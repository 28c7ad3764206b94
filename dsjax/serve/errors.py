"""Errors answered in OpenAI's JSON shape."""
from __future__ import annotations

from fastapi import responses


class APIError(Exception):
  """An error answered in OpenAI's shape."""

  def __init__(self, status: int, message: str, *, type: str = 'invalid_request_error', param: str | None = None,
               code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str = 'invalid_request_error', param: str | None = None,
                   code: str | None = None) -> responses.JSONResponse:
  return responses.JSONResponse({'error': dict(message=message, type=type, param=param, code=code)}, status)
