"""The OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI).

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with stream=true as server-sent events),
GET /v1/models, GET /health, GET /metrics (Prometheus, dsjax/serve/metrics.py). Errors use OpenAI's shape
{"error": {"message", "type", "param", "code"}}.
Sampling: temperature, top_p, top_k (an extension), seed, stop (strings), max_tokens; n must be 1.
Request bodies are the pydantic models CompletionRequest and ChatRequest: unknown fields are ignored (as OpenAI
does), a wrong type or value is a 400 naming the field, another model's name a 404 (code model_not_found).
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
import hmac
import json
import logging
import re
import secrets
import time
from typing import TYPE_CHECKING, Annotated, Any, AsyncIterator, Literal, Mapping, Sequence

import fastapi
from fastapi import responses
import pydantic
from pydantic import Field
import pydantic_core
from starlette import datastructures as starlette_datastructures
from starlette import exceptions as starlette_exceptions

from dsjax.retrieval import prompt as prompt_lib
from dsjax.sample import engine as engine_lib
from dsjax.serve.chat import ChatFormatter
from dsjax.serve import limits as limits_lib
from dsjax.serve import metrics as metrics_lib
from dsjax.serve.errors import APIError, error_response, validation_error
from dsjax.serve.safety import OutputFilter, SafetyConfig

if TYPE_CHECKING:
  from dsjax.retrieval.index import RetrievalIndex

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
DEFAULT_RETRIEVAL_K, MAX_RETRIEVAL_K = 2, 20  # the `retrieval` extension of /v1/completions
MAX_RETRIEVED_CHARS = 8000  # retrieved text per prompt, at most (less when the context is short)
DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks whether its client went away
_REQUEST_ID = re.compile(r'[A-Za-z0-9._:-]{1,128}')  # a client's X-Request-Id we echo (anything else: a new id)
log = logging.getLogger('dsjax.serve')

# ---- request bodies ----

def _one_message(message: str) -> pydantic.WrapValidator:
  """Replaces the errors of a union (pydantic reports each member's) by one message."""
  def validate(value: Any, handler: Any) -> Any:
    try:
      return handler(value)
    except pydantic.ValidationError:
      raise pydantic_core.PydanticCustomError('invalid_type', message) from None
  return pydantic.WrapValidator(validate)


def _unsupported(value: Any) -> Any:
  if value not in (None, False):
    raise pydantic_core.PydanticCustomError('unsupported', 'not supported by this server')
  return value


_MAX_TOKENS = pydantic.AliasChoices('max_tokens', 'max_completion_tokens')  # the first one present
_Unsupported = Annotated[Any, pydantic.AfterValidator(_unsupported)]
_TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]  # below the vocabulary: checked later


class _Body(pydantic.BaseModel):
  """JSON as sent (strict: "5" is not a number, 1 is not true); unknown fields are ignored, as OpenAI does, and a
  null is an absent field."""
  model_config = pydantic.ConfigDict(strict=True, extra='ignore')

  @pydantic.model_validator(mode='before')
  @classmethod
  def _drop_nulls(cls, data: Any) -> Any:
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_Body):
  include_usage: bool = False


class RequestBody(_Body):
  """The fields both endpoints share. Sampling: temperature, top_p, top_k (an extension, 0: off), seed (taken modulo
  2**31; absent: a random one), stop strings, max_tokens (or max_completion_tokens); one choice per request."""
  model: str = Field(min_length=1)
  max_tokens: int | None = Field(None, ge=1, validation_alias=_MAX_TOKENS)  # None: up to the context
  temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
  top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
  top_k: int = Field(0, ge=0)
  seed: Annotated[int, pydantic.AfterValidator(lambda seed: seed % 2**31)] = Field(
      default_factory=lambda: secrets.randbits(31))
  stop: Annotated[list[Annotated[str, Field(min_length=1)]],  # count and length: limits.max_stop(_chars)
                  pydantic.BeforeValidator(lambda stop: [stop] if isinstance(stop, str) else stop)] = []
  stream: bool = False
  stream_options: StreamOptions = StreamOptions()
  n: Literal[1] = 1
  best_of: Literal[1] = 1
  logprobs: _Unsupported = None
  top_logprobs: _Unsupported = None
  echo: _Unsupported = None
  suffix: _Unsupported = None
  tools: _Unsupported = None
  functions: _Unsupported = None


class Retrieval(_Body):
  """The `retrieval` extension of /v1/completions; the index name is checked against the server's indexes."""
  model_config = pydantic.ConfigDict(extra='forbid')
  index: str | None = None
  k: int = Field(DEFAULT_RETRIEVAL_K, ge=1, le=MAX_RETRIEVAL_K)


class CompletionRequest(RequestBody):
  prompt: Annotated[str | _TokenIds,
                    _one_message('Input should be a string or a list of token ids (one prompt per request)'),
                    pydantic.BeforeValidator(lambda p: p[0] if isinstance(p, list) and len(p) == 1
                                             and isinstance(p[0], (str, list)) else p)]  # a batch of one
  max_tokens: int = Field(DEFAULT_COMPLETION_TOKENS, ge=1, validation_alias=_MAX_TOKENS)
  retrieval: Retrieval | None = None


class TextPart(_Body):
  type: Literal['text']
  text: str


class Message(_Body):
  role: Literal['system', 'developer', 'user', 'assistant']
  content: Annotated[str | list[TextPart], _one_message('Input should be a string or a list of text parts')]

  def text(self) -> str:
    return self.content if isinstance(self.content, str) else ''.join(part.text for part in self.content)


class ChatRequest(RequestBody):
  messages: list[Message] = Field(min_length=1)


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
  response, answers 401 for /v1 paths without the API key, and counts the responses of the generation endpoints
  (metrics.HTTP_ENDPOINTS) by status, a request that raised as 500."""

  def __init__(self, app: Any, api_key: str, metrics: metrics_lib.ServeMetrics | None = None):
    self.app, self.api_key, self.metrics = app, api_key, metrics

  async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    headers = starlette_datastructures.Headers(scope=scope)
    given = headers.get('x-request-id', '')
    rid = given if _REQUEST_ID.fullmatch(given) else secrets.token_hex(12)
    scope.setdefault('state', {})['request_id'] = rid
    counted = self.metrics is not None and scope['path'] in metrics_lib.HTTP_ENDPOINTS
    started = False

    async def send_with_id(message: dict) -> None:
      nonlocal started
      if message['type'] == 'http.response.start':
        starlette_datastructures.MutableHeaders(scope=message).append('X-Request-Id', rid)
        if counted and not started:
          self.metrics.count_http(scope['path'], message['status'])
        started = True
      await send(message)

    if self.api_key and scope['path'].startswith('/v1'):
      header = headers.get('authorization', '')
      token = header[len('bearer '):].strip() if header.lower().startswith('bearer ') else ''
      if not token:
        response = error_response(401, 'missing API key: send "Authorization: Bearer <key>"', code='invalid_api_key')
        return await response(scope, receive, send_with_id)
      if not hmac.compare_digest(token.encode(), self.api_key.encode()):
        return await error_response(401, 'invalid API key', code='invalid_api_key')(scope, receive, send_with_id)
    try:
      await self.app(scope, receive, send_with_id)
    except Exception:
      if counted and not started:  # starlette's outermost middleware answers it with a 500
        self.metrics.count_http(scope['path'], 500)
      raise


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
  metrics = metrics_lib.ServeMetrics(engine)

  @contextlib.asynccontextmanager
  async def lifespan(_):
    yield
    if shutdown_engine:
      await asyncio.to_thread(engine.shutdown, cancel=True, timeout=5.0)

  api = fastapi.FastAPI(title='dsjax', lifespan=lifespan)
  api.state.metrics = metrics

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

  api.add_middleware(_Gate, api_key=api_key, metrics=metrics)

  async def read_body(request: fastapi.Request, schema: type[RequestBody]) -> Any:
    """The body as `schema`: 4xx naming the field past the limits or for what the schema refuses, 404 for another
    model."""
    body = limits_lib.parse_json(await limits_lib.read_body(request, limits), limits)
    if not isinstance(body, dict):
      raise APIError(400, 'the request body must be a JSON object')
    try:
      params = schema.model_validate(body)
    except pydantic.ValidationError as e:
      raise validation_error(e) from None
    if params.model != model_name:
      raise APIError(404, f'the model {params.model!r} does not exist; this server serves {model_name!r}',
                     param='model', code='model_not_found')
    if len(params.stop) > limits.max_stop:
      raise APIError(400, f'stop may hold up to {limits.max_stop} strings (max_stop)', param='stop')
    if any(len(s) > limits.max_stop_chars for s in params.stop):
      raise APIError(400, f'each stop string may have up to {limits.max_stop_chars} characters (max_stop_chars)',
                     param='stop')
    return params

  def check_length(prompt_len: int, params: RequestBody) -> None:
    field = 'messages' if isinstance(params, ChatRequest) else 'prompt'
    if limits.max_prompt_tokens and prompt_len > limits.prompt_tokens(max_len):
      raise APIError(400, f'the prompt is {prompt_len} tokens; this server takes up to {limits.prompt_tokens(max_len)} '
                     '(max_prompt_tokens)', param=field, code='context_length_exceeded')
    if prompt_len >= max_len:
      raise APIError(400, f'the prompt is {prompt_len} tokens; this model\'s maximum context length is {max_len}',
                     param=field, code='context_length_exceeded')
    if params.max_tokens is not None and prompt_len + params.max_tokens > max_len:
      raise APIError(400, f'this model\'s maximum context length is {max_len} tokens; you requested '
                     f'{prompt_len + params.max_tokens} ({prompt_len} in the prompt, {params.max_tokens} for the '
                     'completion)', param='max_tokens', code='context_length_exceeded')

  def submit(prompt: list[int], params: RequestBody, on_token) -> engine_lib.Request:
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

  async def run(http_request: fastapi.Request, prompt: list[int], params: RequestBody, kind: str) -> Any:
    """Submits and answers: a JSON response, or an SSE stream of chunks in `kind`'s shape."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[int | None] = asyncio.Queue()

    def on_token(finished: engine_lib.Request, token: int | None) -> None:
      """From the engine thread. The one place that sees every request end (streamed or not, whatever the reason):
      its latencies are recorded before the end reaches the endpoint, so a response implies they are in /metrics."""
      try:
        if token is None:
          metrics.observe_finished(finished)
      finally:  # a metrics bug must not leave the endpoint waiting for the end
        loop.call_soon_threadsafe(events.put_nowait, token)

    request = submit(prompt, params, on_token)
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
      if params.stream_options.include_usage:
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
          if params.stream_options.include_usage:
            yield f'data: {json.dumps({**base, "object": chunk_object, "choices": [], "usage": usage()})}\n\n'
        yield 'data: [DONE]\n\n'
      finally:
        request.cancel()  # the client went away: free the slot
        if not finished:
          log_done(disconnected=True)

    return responses.StreamingResponse(sse(), media_type='text/event-stream',
                                       headers={'Cache-Control': 'no-cache', 'X-Accel-Buffering': 'no'})

  async def retrieve(prompt: str, spec: Retrieval, params: CompletionRequest) -> str:
    """`prompt` with the snippets that `spec` asks for prepended, as many as leave room for max_tokens in the
    context; searched off the event loop (a dense index runs the model)."""
    if spec.index not in indexes:
      available = ', '.join(sorted(indexes)) or 'none (start the server with --retrieval_index=NAME=DIR)'
      raise APIError(400, f'unknown retrieval index {spec.index!r}; available: {available}', param='retrieval.index',
                     code='index_not_found')
    budget = max_len - params.max_tokens

    def search_and_augment() -> str:
      hits = indexes[spec.index].search(prompt_lib.build_query(prompt), spec.k)
      return prompt_lib.fit_augmented(prompt, hits, tokenizer, budget, max_chars=MAX_RETRIEVED_CHARS)

    return await asyncio.to_thread(search_and_augment)

  @api.post('/v1/completions')
  async def completions(request: fastapi.Request):
    params = await read_body(request, CompletionRequest)
    prompt = params.prompt
    if isinstance(prompt, str) and len(prompt) > limits.max_prompt_chars:
      raise APIError(400, f'the prompt has {len(prompt)} characters; this server takes up to '
                     f'{limits.max_prompt_chars} (max_prompt_chars)', param='prompt', code='prompt_too_long')
    if params.retrieval is not None and not isinstance(prompt, str):
      raise APIError(400, 'retrieval needs a text prompt, not token ids', param='retrieval')
    if params.retrieval is not None:
      prompt = await retrieve(prompt, params.retrieval, params)
    if isinstance(prompt, str):
      ids = [tokenizer.bos_id] + [int(t) for t in tokenizer.encode(prompt)]
    elif max(prompt) >= tokenizer.vocab_size:
      raise APIError(400, f'prompt: token ids must be below the vocabulary size, {tokenizer.vocab_size}',
                     param='prompt')
    else:
      ids = prompt  # token ids, used as given
    check_length(len(ids), params)
    return await run(request, ids, params, 'completion')

  @api.post('/v1/chat/completions')
  async def chat_completions(request: fastapi.Request):
    params = await read_body(request, ChatRequest)
    if len(params.messages) > limits.max_messages:
      raise APIError(400, f'{len(params.messages)} messages; this server takes up to {limits.max_messages} '
                     '(max_messages)', param='messages', code='too_many_messages')
    messages = [dict(role='system' if m.role == 'developer' else m.role, content=m.text()) for m in params.messages]
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

  @api.get('/metrics')
  async def prometheus_metrics():
    """Prometheus text exposition (dsjax/serve/metrics.py). Like /health it is outside /v1, so it needs no API key:
    scrapers and probes run without the app's credentials, and it holds aggregate counts and latencies only (no
    prompts, outputs or request ids). Keep the port private (the default bind is 127.0.0.1) if even that matters."""
    body, content_type = metrics.render()
    return responses.Response(body, headers={'Content-Type': content_type})

  return api
