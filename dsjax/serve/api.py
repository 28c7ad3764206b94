"""The OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI).

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with stream=true as server-sent events),
GET /v1/models, GET /health. Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}.
Sampling: temperature, top_p, top_k (an extension), seed, stop (strings), max_tokens; n must be 1.
Retrieval (an extension of /v1/completions): `"retrieval": {"index": NAME, "k": INT}` prepends the index's top k
snippets for the prompt's last lines (dsjax/retrieval); usage.prompt_tokens counts the augmented prompt.
`create_app` builds the app around an existing engine (serve.py, tests, bench/serve.py).

Robustness: request sizes and shapes are bounded by `limits.Limits` (4xx naming the field); a request's id (the
client's X-Request-Id, or a new one) is in the response id, the X-Request-Id header and the `dsjax.serve` log line
of each request; a request past limits.request_timeout ends with 504; a client that disconnects cancels its request
(its slot is freed at the engine's next step); GET /health answers 503 once the engine cannot serve.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import re
import secrets
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping, Sequence

import fastapi
from fastapi import responses
from starlette import datastructures as starlette_datastructures
from starlette import exceptions as starlette_exceptions

from dsjax.sample import engine as engine_lib
from dsjax.serve.chat import ChatFormatter
from dsjax.serve import limits as limits_lib
from dsjax.serve.errors import APIError, error_response
from dsjax.serve.safety import OutputFilter, SafetyConfig

if TYPE_CHECKING:
  from dsjax.retrieval.index import RetrievalIndex

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
DEFAULT_RETRIEVAL_K, MAX_RETRIEVAL_K = 2, 20  # the `retrieval` extension of /v1/completions
MAX_RETRIEVED_CHARS = 8000  # retrieved text per prompt, at most (less when the context is short)
DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks whether its client went away
_REQUEST_ID = re.compile(r'[A-Za-z0-9._:-]{1,128}')  # a client's X-Request-Id we echo (anything else: a new id)
log = logging.getLogger('dsjax.serve')

@dataclasses.dataclass
class Params:
  """The validated sampling settings of one request."""
  max_tokens: int | None
  temperature: float
  top_p: float
  top_k: int
  seed: int
  stop: list[str]
  stream: bool
  include_usage: bool


def _number(body: dict, name: str, default: Any, kind: type, ok, rule: str) -> Any:
  """body[name] as an int or float (default when absent or null); APIError(400) naming it for a wrong type, a value
  outside float range (JSON allows 1e999 and 10**400), or one that `ok` rejects."""
  value = body.get(name)
  if value is None:
    return default
  wanted = 'an integer' if kind is int else 'a finite number'
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise APIError(400, f'{name} must be {wanted}, got {value!r}', param=name)
  if isinstance(value, float) and not math.isfinite(value):
    raise APIError(400, f'{name} must be {wanted}, got {value!r}', param=name)
  if kind is int and isinstance(value, float) and not value.is_integer():
    raise APIError(400, f'{name} must be {wanted}, got {value!r}', param=name)
  try:
    value = kind(value)
  except OverflowError:  # an int past float range, for a float field
    raise APIError(400, f'{name} must be {wanted} in float range', param=name) from None
  if not ok(value):
    raise APIError(400, f'{name} must be {rule}, got {value!r}', param=name)
  return value


def parse_params(body: dict, default_max_tokens: int | None,
                 limits: limits_lib.Limits = limits_lib.Limits()) -> Params:
  """Common fields of both endpoints; APIError(400) for a bad or unsupported value."""
  _number(body, 'n', 1, int, lambda v: v == 1, '1 (one choice per request is supported)')
  _number(body, 'best_of', 1, int, lambda v: v == 1, '1 (one choice per request is supported)')
  for name in ('logprobs', 'top_logprobs', 'echo', 'suffix', 'tools', 'functions'):
    if body.get(name) not in (None, False):
      raise APIError(400, f'{name} is not supported by this server', param=name)
  stop = body.get('stop')
  stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or len(stop) > limits.max_stop or not all(isinstance(s, str) and s for s in stop):
    raise APIError(400, f'stop must be a non-empty string or a list of up to {limits.max_stop} of them (max_stop)',
                   param='stop')
  if any(len(s) > limits.max_stop_chars for s in stop):
    raise APIError(400, f'each stop string may have up to {limits.max_stop_chars} characters (max_stop_chars)',
                   param='stop')
  stream = body.get('stream', False)
  if not isinstance(stream, bool) and stream is not None:
    raise APIError(400, 'stream must be a boolean', param='stream')
  options = body.get('stream_options') or {}
  if not isinstance(options, dict):
    raise APIError(400, 'stream_options must be an object', param='stream_options')
  max_tokens_field = 'max_tokens' if body.get('max_tokens') is not None else 'max_completion_tokens'
  return Params(
      max_tokens=_number(body, max_tokens_field, default_max_tokens, int, lambda v: v >= 1, '>= 1'),
      temperature=_number(body, 'temperature', 1.0, float, lambda v: v >= 0, '>= 0'),
      top_p=_number(body, 'top_p', 1.0, float, lambda v: 0 < v <= 1, 'in (0, 1]'),
      top_k=_number(body, 'top_k', 0, int, lambda v: v >= 0, '>= 0'),
      seed=_number(body, 'seed', None, int, lambda v: True, 'an integer') % 2**31 if body.get('seed') is not None
      else secrets.randbits(31),
      stop=stop, stream=bool(stream), include_usage=bool(options.get('include_usage')))


class TextStream:
  """Incremental detokenization with stop strings: `push(token)` -> new text safe to send (no partial UTF-8
  character, nothing that could still turn out to be the start of a stop string); `stopped` once one matched."""

  def __init__(self, tokenizer: Any, stop: Sequence[str]):
    self.tokenizer, self.stop = tokenizer, list(stop)
    self.ids: list[int] = []
    self.sent = 0  # characters of the text already returned
    self.stopped = False
    self.text = ''

  def push(self, token: int | None) -> str:
    """A token, or None at the end (flushes whatever is held back)."""
    if self.stopped:
      return ''
    if token is not None:
      self.ids.append(token)
    text = self.tokenizer.decode(self.ids)
    cut = min((i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0), default=-1)
    if cut >= 0:
      self.stopped, text = True, text[:cut]
      ready = len(text)
    elif token is None:
      ready = len(text)
    else:
      ready = len(text) - 1 if text.endswith('\ufffd') else len(text)  # a character still being decoded
      # Hold back the longest suffix that may be the start of a stop string.
      hold = max((k for s in self.stop for k in range(1, len(s)) if text[:ready].endswith(s[:k])), default=0)
      ready -= hold
    self.text = text[:max(ready, self.sent)]
    out = text[self.sent:ready] if ready > self.sent else ''
    self.sent = max(self.sent, ready)
    return out


# ---- the app ----

class _Gate:
  """Pure ASGI middleware (starlette's BaseHTTPMiddleware hides client disconnects from the endpoint): gives each
  request its id (the client's X-Request-Id when it is a plain token, else a new one) in scope['state'] and on the
  response, and answers 401 for /v1 paths without the API key."""

  def __init__(self, app: Any, api_key: str):
    self.app, self.api_key = app, api_key

  async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    headers = starlette_datastructures.Headers(scope=scope)
    given = headers.get('x-request-id', '')
    rid = given if _REQUEST_ID.fullmatch(given) else secrets.token_hex(12)
    scope.setdefault('state', {})['request_id'] = rid

    async def send_with_id(message: dict) -> None:
      if message['type'] == 'http.response.start':
        starlette_datastructures.MutableHeaders(scope=message).append('X-Request-Id', rid)
      await send(message)

    if self.api_key and scope['path'].startswith('/v1'):
      header = headers.get('authorization', '')
      token = header[len('bearer '):].strip() if header.lower().startswith('bearer ') else ''
      if not token:
        response = error_response(401, 'missing API key: send "Authorization: Bearer <key>"', code='invalid_api_key')
        return await response(scope, receive, send_with_id)
      if not hmac.compare_digest(token.encode(), self.api_key.encode()):
        return await error_response(401, 'invalid API key', code='invalid_api_key')(scope, receive, send_with_id)
    await self.app(scope, receive, send_with_id)


def create_app(engine: engine_lib.Engine, tokenizer: Any, model_name: str, api_key: str = '',
               max_len: int | None = None, chat_template: str | None = None,
               shutdown_engine: bool = False, safety: SafetyConfig | None = None,
               retrieval_indexes: Mapping[str, RetrievalIndex] | None = None,
               limits: limits_lib.Limits | None = None, stall_timeout: float | None = None) -> fastapi.FastAPI:
  """The FastAPI app serving `engine` (prompt + completion <= max_len, default the engine's). With
  shutdown_engine, the app's shutdown (e.g. SIGTERM under uvicorn) shuts the engine down too. `safety`: an output
  filter for the request kinds it applies to (dsjax/serve/safety.py; None: off). `retrieval_indexes`: name ->
  index that /v1/completions requests may name in their `retrieval` field (dsjax/retrieval). `limits`: what a
  request may hold (default limits.Limits()). `stall_timeout`: /health answers 503 once one device call has run
  longer than this many seconds (None: never)."""
  indexes = dict(retrieval_indexes or {})
  limits = limits or limits_lib.Limits()
  max_len = int(max_len or engine.max_len)
  chat = ChatFormatter(tokenizer, chat_template)
  created = int(time.time())

  @contextlib.asynccontextmanager
  async def lifespan(_):
    yield
    if shutdown_engine:
      await asyncio.to_thread(engine.shutdown, cancel=True, timeout=5.0)

  api = fastapi.FastAPI(title='dsjax', lifespan=lifespan)

  @api.exception_handler(APIError)
  async def _api_error(request: fastapi.Request, e: APIError):
    log.info('request %s %s: %d %s', request_id(request), request.url.path, e.status, e.message)
    return error_response(e.status, e.message, e.type, e.param, e.code)

  @api.exception_handler(starlette_exceptions.HTTPException)
  async def _http_error(_, e: starlette_exceptions.HTTPException):
    return error_response(e.status_code, str(e.detail), 'invalid_request_error')

  @api.exception_handler(Exception)
  async def _internal_error(request: fastapi.Request, e: Exception):
    log.error('request %s %s failed', request_id(request), request.url.path, exc_info=e)
    return error_response(500, f'internal error: {type(e).__name__}: {e}', 'server_error')

  def request_id(request: fastapi.Request) -> str:
    return getattr(request.state, 'request_id', '-')

  api.add_middleware(_Gate, api_key=api_key)

  async def read_body(request: fastapi.Request) -> dict:
    body = limits_lib.parse_json(await limits_lib.read_body(request, limits), limits)
    if not isinstance(body, dict):
      raise APIError(400, 'the request body must be a JSON object')
    model = body.get('model')
    if not isinstance(model, str) or not model:
      raise APIError(400, 'model is required (a string)', param='model')
    if model != model_name:
      raise APIError(404, f'the model {model!r} does not exist; this server serves {model_name!r}', param='model',
                     code='model_not_found')
    return body

  def check_length(prompt_len: int, params: Params) -> None:
    if limits.max_prompt_tokens and prompt_len > limits.prompt_tokens(max_len):
      raise APIError(400, f'the prompt is {prompt_len} tokens; this server takes up to {limits.prompt_tokens(max_len)} '
                     '(max_prompt_tokens)', param='messages' if params.max_tokens is None else 'prompt',
                     code='context_length_exceeded')
    if prompt_len >= max_len:
      raise APIError(400, f'the prompt is {prompt_len} tokens; this model\'s maximum context length is {max_len}',
                     param='messages' if params.max_tokens is None else 'prompt', code='context_length_exceeded')
    if params.max_tokens is not None and prompt_len + params.max_tokens > max_len:
      raise APIError(400, f'this model\'s maximum context length is {max_len} tokens; you requested '
                     f'{prompt_len + params.max_tokens} ({prompt_len} in the prompt, {params.max_tokens} for the '
                     'completion)', param='max_tokens', code='context_length_exceeded')

  def submit(prompt: list[int], params: Params, on_token) -> engine_lib.Request:
    try:
      return engine.submit(prompt, params.max_tokens or max_len - len(prompt), temperature=params.temperature,
                           top_k=params.top_k, top_p=params.top_p, stop_ids=[tokenizer.eos_id], seed=params.seed,
                           on_token=on_token, timeout=limits.request_timeout or None)
    except engine_lib.QueueFull as e:
      raise APIError(429, f'server busy: {e}', type='rate_limit_error', code='queue_full') from None
    except engine_lib.EngineClosed as e:
      raise APIError(503, str(e), type='server_error', code='shutting_down') from None
    except ValueError as e:
      raise APIError(400, str(e)) from None

  async def run(http_request: fastapi.Request, prompt: list[int], params: Params, kind: str) -> Any:
    """Submits and answers: a JSON response, or an SSE stream of chunks in `kind`'s shape."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[int | None] = asyncio.Queue()
    request = submit(prompt, params, lambda _, token: loop.call_soon_threadsafe(events.put_nowait, token))
    started = time.perf_counter()
    rid = f'{"chatcmpl" if kind == "chat" else "cmpl"}-{request_id(http_request)}'
    text = TextStream(tokenizer, params.stop)
    guard = OutputFilter(safety, name=rid) if safety is not None and safety.applies_to(kind) else None
    base = dict(id=rid, object='chat.completion' if kind == 'chat' else 'text_completion', created=int(time.time()),
                model=model_name)

    async def tokens() -> AsyncIterator[str]:
      """Text pieces as they become safe to send; cancels the request early on a stop string or a refusal."""
      while True:
        token = await events.get()
        piece = text.push(token)
        if guard is not None:  # a classifier hook may be slow: off the event loop then
          piece = await asyncio.to_thread(screen, piece, token is None) if safety.hook else screen(piece, token is None)
        if piece:
          yield piece
        if token is None:
          return
        if ended_early():
          request.cancel()

    def screen(piece: str, last: bool) -> str:
      return guard.push(piece) + (guard.finish() if last else '')

    def ended_early() -> bool:
      return text.stopped or (guard is not None and guard.refused)

    def finish_reason() -> str:
      if guard is not None and guard.refused:
        return 'content_filter'
      return 'stop' if text.stopped or request.finish_reason == 'stop' else 'length'

    def usage() -> dict[str, int]:
      return dict(prompt_tokens=len(prompt), completion_tokens=len(request.tokens),
                  total_tokens=len(prompt) + len(request.tokens))

    def failure() -> APIError | None:
      """What ended the request, if it did not finish normally."""
      if request.finish_reason == 'error':
        return APIError(500, f'generation failed: {type(request.error).__name__}: {request.error}',
                        type='server_error', code='generation_failed')
      if request.finish_reason == 'timeout':
        return APIError(504, f'the request took longer than {limits.request_timeout:g} s (request_timeout)',
                        type='server_error', code='request_timeout')
      if request.finish_reason == 'cancelled' and not ended_early():
        return APIError(503, 'the request was cancelled (client disconnected or server shutting down)',
                        type='server_error', code='cancelled')
      return None

    def log_done(disconnected: bool = False) -> None:
      log.info('request %s %s: prompt %d tokens, completion %d tokens, %s%s in %.3f s', request_id(http_request),
               kind, len(prompt), len(request.tokens), request.finish_reason,
               ' (client disconnected)' if disconnected else '', time.perf_counter() - started)

    async def watch_disconnect() -> None:
      """Cancels the request when its (non-streaming) client goes away: starlette only notices for streams."""
      while not request.done:
        if await http_request.is_disconnected():
          request.cancel()
          log_done(disconnected=True)
          return
        await asyncio.sleep(DISCONNECT_POLL_S)

    if not params.stream:
      watcher = asyncio.create_task(watch_disconnect())
      try:
        async for _ in tokens():
          pass
      finally:
        request.cancel()  # a no-op when done; frees the slot if the client went away
        watcher.cancel()
      log_done()
      error = failure()
      if error is not None:
        raise error
      content = guard.text if guard is not None else text.text
      if kind == 'chat':
        choice = dict(index=0, message=dict(role='assistant', content=content), logprobs=None,
                      finish_reason=finish_reason())
      else:
        choice = dict(index=0, text=content, logprobs=None, finish_reason=finish_reason())
      return responses.JSONResponse({**base, 'choices': [choice], 'usage': usage()})

    chunk_object = 'chat.completion.chunk' if kind == 'chat' else 'text_completion'

    def chunk(piece: str | None, reason: str | None, first: bool = False) -> str:
      if kind == 'chat':
        delta = {'role': 'assistant', 'content': ''} if first else {} if piece is None else {'content': piece}
        choice = dict(index=0, delta=delta, logprobs=None, finish_reason=reason)
      else:
        choice = dict(index=0, text=piece or '', logprobs=None, finish_reason=reason)
      data = {**base, 'object': chunk_object, 'choices': [choice]}
      if params.include_usage:
        data['usage'] = None
      return f'data: {json.dumps(data)}\n\n'

    async def sse() -> AsyncIterator[str]:
      finished = False
      try:
        if kind == 'chat':
          yield chunk(None, None, first=True)
        async for piece in tokens():
          yield chunk(piece, None)
        finished = True
        log_done()
        error = failure()
        if error is not None:
          data = dict(message=error.message, type=error.type, param=None, code=error.code)
          yield f'data: {json.dumps({"error": data})}\n\n'
        else:
          yield chunk(None, finish_reason())
          if params.include_usage:
            yield f'data: {json.dumps({**base, "object": chunk_object, "choices": [], "usage": usage()})}\n\n'
        yield 'data: [DONE]\n\n'
      finally:
        request.cancel()  # the client went away: free the slot
        if not finished:
          log_done(disconnected=True)

    return responses.StreamingResponse(sse(), media_type='text/event-stream',
                                       headers={'Cache-Control': 'no-cache', 'X-Accel-Buffering': 'no'})

  async def retrieve(prompt: str, spec: Any, params: Params) -> str:
    """`prompt` with the snippets that `spec` ({"index": NAME, "k": INT}) asks for prepended, as many as leave
    room for max_tokens in the context; searched off the event loop (a dense index runs the model)."""
    from dsjax.retrieval import prompt as prompt_lib  # pylint: disable=g-import-not-at-top
    if not isinstance(spec, dict) or set(spec) - {'index', 'k'}:
      raise APIError(400, 'retrieval must be an object {"index": NAME, "k": INT}', param='retrieval')
    name = spec.get('index')
    if not isinstance(name, str) or name not in indexes:
      available = ', '.join(sorted(indexes)) or 'none (start the server with --retrieval_index=NAME=DIR)'
      raise APIError(400, f'unknown retrieval index {name!r}; available: {available}', param='retrieval.index',
                     code='index_not_found')
    k = spec.get('k', DEFAULT_RETRIEVAL_K)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_RETRIEVAL_K:
      raise APIError(400, f'retrieval.k must be an integer in [1, {MAX_RETRIEVAL_K}], got {k!r}', param='retrieval.k')
    budget = max_len - (params.max_tokens or DEFAULT_COMPLETION_TOKENS)

    def search_and_augment() -> str:
      hits = indexes[name].search(prompt_lib.build_query(prompt), k)
      return prompt_lib.fit_augmented(prompt, hits, tokenizer, budget, max_chars=MAX_RETRIEVED_CHARS)

    return await asyncio.to_thread(search_and_augment)

  @api.post('/v1/completions')
  async def completions(request: fastapi.Request):
    body = await read_body(request)
    params = parse_params(body, DEFAULT_COMPLETION_TOKENS, limits)
    prompt = body.get('prompt')
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
      prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and len(prompt) > limits.max_prompt_chars:
      raise APIError(400, f'the prompt has {len(prompt)} characters; this server takes up to '
                     f'{limits.max_prompt_chars} (max_prompt_chars)', param='prompt', code='prompt_too_long')
    if body.get('retrieval') is not None and isinstance(prompt, str):
      prompt = await retrieve(prompt, body['retrieval'], params)
    elif body.get('retrieval') is not None and isinstance(prompt, list):
      raise APIError(400, 'retrieval needs a text prompt, not token ids', param='retrieval')
    if isinstance(prompt, str):
      ids = [tokenizer.bos_id] + [int(t) for t in tokenizer.encode(prompt)]
    elif (isinstance(prompt, list) and prompt and
          all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tokenizer.vocab_size for t in prompt)):
      ids = list(prompt)  # token ids, used as given
    else:
      raise APIError(400, 'prompt must be a string, or a list of token ids (one prompt per request)', param='prompt')
    check_length(len(ids), params)
    return await run(request, ids, params, 'completion')

  @api.post('/v1/chat/completions')
  async def chat_completions(request: fastapi.Request):
    body = await read_body(request)
    params = parse_params(body, None, limits)
    messages = body.get('messages')
    if not isinstance(messages, list) or not messages:
      raise APIError(400, 'messages must be a non-empty list', param='messages')
    if len(messages) > limits.max_messages:
      raise APIError(400, f'{len(messages)} messages; this server takes up to {limits.max_messages} (max_messages)',
                     param='messages', code='too_many_messages')
    for m in messages:
      if not isinstance(m, dict) or m.get('role') not in ('system', 'developer', 'user', 'assistant'):
        raise APIError(400, 'each message needs a role of system, developer, user or assistant', param='messages')
      if isinstance(m.get('content'), list):  # content parts: text only
        parts = m['content']
        if not all(isinstance(p, dict) and p.get('type') == 'text' and isinstance(p.get('text'), str) for p in parts):
          raise APIError(400, 'only text content parts are supported', param='messages')
        m['content'] = ''.join(p['text'] for p in parts)
      if not isinstance(m.get('content'), str):
        raise APIError(400, 'each message needs a string content', param='messages')
    messages = [dict(role='system' if m['role'] == 'developer' else m['role'], content=m['content'])
                for m in messages]
    chars = sum(len(m['content']) for m in messages)
    if chars > limits.max_prompt_chars:
      raise APIError(400, f'the messages have {chars} characters; this server takes up to {limits.max_prompt_chars} '
                     '(max_prompt_chars)', param='messages', code='prompt_too_long')
    # Drop the oldest turns (never the system prompt or the last message) until the prompt fits.
    budget = min(max_len - (params.max_tokens or 1), limits.prompt_tokens(max_len))
    system = [m for m in messages if m['role'] == 'system']
    turns = [m for m in messages if m['role'] != 'system']
    ids = chat(system + turns)
    while len(ids) > budget and len(turns) > 1:
      turns = turns[1:]
      ids = chat(system + turns)
    check_length(len(ids), params)
    return await run(request, ids, params, 'chat')

  @api.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': [dict(id=model_name, object='model', created=created, owned_by='dsjax',
                                            max_model_len=max_len)]}

  @api.get('/health')
  async def health():
    """200 while the engine serves; 503 once its thread has ended or a device call hangs past stall_timeout."""
    state = engine.health(stall_timeout)
    body = {'status': 'ok' if state['ok'] else 'error', **engine.stats(), **state}
    return responses.JSONResponse(body, 200 if state['ok'] else 503)

  return api
