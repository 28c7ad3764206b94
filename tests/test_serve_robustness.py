"""The server survives any request: issue 18's three crashing requests, the input limits, request ids, timeouts,
client disconnects, an honest /health, and property-based fuzzing of both completion endpoints (hypothesis).

In-process through starlette's TestClient, except the disconnect tests, which need a real socket to drop."""
import contextlib
import json
import os
import socket
import threading
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest
from starlette.testclient import TestClient

from dsjax.data import tokenizer as tokenizer_lib
from dsjax.sample import engine as engine_lib
from dsjax.serve import api as serve_api
from dsjax.serve import limits as limits_lib
from tests import test_serve
from tests.sample import test_engine
from tests.sample import test_engine_failures

MAX_LEN = test_engine.MAX_LEN
TOKENIZER = tokenizer_lib.load_tokenizer('byte')
KEY = 'k'
AUTH = {'Authorization': f'Bearer {KEY}'}
TIGHT = limits_lib.Limits(max_body_bytes=4096, max_json_depth=8, max_prompt_chars=30, max_prompt_tokens=24,
                          max_messages=4, max_stop=2, max_stop_chars=8, request_timeout=60)
FUZZ_EXAMPLES = int(os.environ.get('DSJAX_FUZZ_EXAMPLES', '120'))  # per endpoint; more for a longer local run
FUZZ_RANDOM = bool(os.environ.get('DSJAX_FUZZ_RANDOM'))  # new examples each run (CI: the same derandomized ones)


@pytest.fixture(scope='module')
def engine():
  model, params, _ = test_engine.shared_model()
  engine = engine_lib.Engine(model, params, num_slots=2, max_len=MAX_LEN, max_queue=8,
                             vocab_limit=TOKENIZER.vocab_size)
  yield engine
  engine.shutdown(cancel=True)


@pytest.fixture(scope='module')
def default_client(engine):
  """The app with the default limits."""
  with TestClient(serve_api.create_app(engine, TOKENIZER, 'tiny', api_key=KEY, max_len=MAX_LEN)) as client:
    yield client


@pytest.fixture(scope='module')
def tight_client(engine):
  """The app with small limits, so each one is cheap to reach."""
  with TestClient(serve_api.create_app(engine, TOKENIZER, 'tiny', api_key=KEY, max_len=MAX_LEN,
                                       limits=TIGHT)) as client:
    yield client


def post(client, path, body, headers=None):
  """A raw POST: `body` bytes as given, anything else as JSON (NaN/Infinity and lone surrogates as Python writes
  them); returns the response."""
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  return client.post(path, content=data, headers={'Content-Type': 'application/json', **AUTH, **(headers or {})})


def assert_openai_error(response, status, param=None, code=None):
  assert response.status_code == status, response.text
  error = response.json()['error']
  assert set(error) == {'message', 'type', 'param', 'code'} and error['message'], error
  if param is not None:
    assert error['param'] == param, error
  if code is not None:
    assert error['code'] == code, error
  return error


def assert_serving(client):
  """A normal request still gets the right greedy answer, and /health says ok."""
  response = post(client, '/v1/completions', dict(model='tiny', prompt='hello world', max_tokens=4, temperature=0))
  assert response.status_code == 200, response.text
  assert response.json()['choices'][0]['text'] == test_serve.expected_text(test_serve.ids_of('hello world'), 4)
  health = client.get('/health')
  assert health.status_code == 200 and health.json()['status'] == 'ok'


# ---- issue 18's three requests ----

def test_top_k_past_int32_is_served_and_the_engine_lives(default_client, engine):
  for top_k in (10**12, 2**31, 2**63):
    response = post(default_client, '/v1/completions', dict(model='tiny', prompt='def ', max_tokens=4, top_k=top_k))
    assert response.status_code == 200, response.text
  # top_k beyond the vocabulary means no top-k filtering: the same draw as top_k=0 with the same seed.
  same = [post(default_client, '/v1/completions', dict(model='tiny', prompt='def ', max_tokens=6, seed=11, top_k=k))
          .json()['choices'][0]['text'] for k in (0, 10**12)]
  assert same[0] == same[1]
  assert engine.stats()['restarts'] == 0
  assert_serving(default_client)


@pytest.mark.parametrize('body', [
    b'[' * 100_000 + b']' * 100_000,
    b'{"model": "tiny", "prompt": ' + b'[' * 100_000 + b']' * 100_000 + b'}',
])
def test_deeply_nested_json_is_a_400(default_client, body):
  assert_openai_error(post(default_client, '/v1/completions', body), 400, code='too_deeply_nested')
  assert_serving(default_client)


@pytest.mark.parametrize('path, body, param', [
    ('/v1/completions', dict(model='tiny', prompt='abc\ud800'), 'prompt'),
    ('/v1/completions', dict(model='tiny', prompt=['abc\udfff']), 'prompt[0]'),
    ('/v1/completions', dict(model='tiny', prompt='a', stop=['x', '\ud800']), 'stop[1]'),
    ('/v1/completions', {'model': 'tiny', 'prompt': 'a', 'extra\ud800': 1}, 'extra\\ud800'),
    ('/v1/chat/completions', dict(model='tiny', messages=[{'role': 'user', 'content': 'abc\ud800'}]),
     'messages[0].content'),
    ('/v1/chat/completions', dict(model='tiny', messages=[{'role': 'user', 'content': [
        {'type': 'text', 'text': 'ok'}, {'type': 'text', 'text': '\udc80'}]}]), 'messages[0].content[1].text'),
])
def test_lone_surrogates_are_a_400_naming_the_field(default_client, path, body, param):
  assert_openai_error(post(default_client, path, body), 400, param=param, code='invalid_text')
  assert_serving(default_client)


# ---- request bodies (pydantic models) ----

BODIES = {'/v1/completions': dict(model='tiny', prompt='hello world', max_tokens=3),
          '/v1/chat/completions': dict(model='tiny', messages=[{'role': 'user', 'content': 'hi'}], max_tokens=3)}


@pytest.mark.parametrize('path, field, value, param, message', [
    ('/v1/completions', 'max_tokens', 'ten', 'max_tokens', 'max_tokens: Input should be a valid integer'),
    ('/v1/completions', 'max_tokens', 2.5, 'max_tokens', 'max_tokens: Input should be a valid integer'),
    ('/v1/completions', 'temperature', 'hot', 'temperature', 'temperature: Input should be a valid number'),
    ('/v1/completions', 'temperature', True, 'temperature', 'temperature: Input should be a valid number'),
    ('/v1/completions', 'temperature', -1, 'temperature', 'temperature: Input should be greater than or equal to 0'),
    ('/v1/completions', 'top_k', -1, 'top_k', 'top_k: Input should be greater than or equal to 0'),
    ('/v1/completions', 'stream', 'maybe', 'stream', 'stream: Input should be a valid boolean'),
    ('/v1/completions', 'seed', '7', 'seed', 'seed: Input should be a valid integer'),
    ('/v1/completions', 'n', 3, 'n', 'n: Input should be 1'),
    ('/v1/completions', 'logprobs', 5, 'logprobs', 'logprobs: not supported by this server'),
    ('/v1/completions', 'prompt', [[1, 2], [3]], 'prompt',
     'prompt: Input should be a string or a list of token ids (one prompt per request)'),
    ('/v1/completions', 'stop', ['a', ''], 'stop', 'stop[1]: String should have at least 1 character'),
    ('/v1/completions', 'max_completion_tokens', 0, 'max_completion_tokens',
     'max_completion_tokens: Input should be greater than or equal to 1'),
    ('/v1/chat/completions', 'messages', 'hi', 'messages', 'messages: Input should be a valid list'),
    ('/v1/chat/completions', 'messages', [{'role': 'user', 'content': 7}], 'messages',
     'messages[0].content: Input should be a string or a list of text parts'),
    ('/v1/chat/completions', 'messages', [{'role': 'tool', 'content': 'x'}], 'messages',
     "messages[0].role: Input should be 'system', 'developer', 'user' or 'assistant'"),
    ('/v1/chat/completions', 'stream_options', {'include_usage': 'yes'}, 'stream_options.include_usage',
     'stream_options.include_usage: Input should be a valid boolean'),
])
def test_a_wrong_type_or_value_is_a_400_naming_the_field(default_client, path, field, value, param, message):
  body = {k: v for k, v in BODIES[path].items() if k != 'max_tokens' or field != 'max_completion_tokens'}
  error = assert_openai_error(post(default_client, path, {**body, field: value}), 400, param=param)
  assert error['message'] == message and error['type'] == 'invalid_request_error'


@pytest.mark.parametrize('path', sorted(BODIES))
def test_an_unknown_model_is_a_404_and_a_missing_one_a_400(default_client, path):
  error = assert_openai_error(post(default_client, path, {**BODIES[path], 'model': 'no-such-model'}), 404,
                              param='model', code='model_not_found')
  assert error['type'] == 'invalid_request_error' and "'no-such-model' does not exist" in error['message']
  missing = {k: v for k, v in BODIES[path].items() if k != 'model'}
  error = assert_openai_error(post(default_client, path, missing), 400, param='model')
  assert error['message'] == 'model: Field required'


@pytest.mark.parametrize('path', sorted(BODIES))
def test_unknown_fields_are_ignored_and_nulls_are_defaults(default_client, path):
  plain = post(default_client, path, {**BODIES[path], 'temperature': 0})
  extra = dict(user='u1', frequency_penalty=0.5, no_such_field={'a': [1]}, metadata=None, top_p=None, stop=None,
               stream=None, logprobs=False)
  response = post(default_client, path, {**BODIES[path], 'temperature': 0, **extra})
  assert plain.status_code == 200 and response.status_code == 200, response.text
  assert response.json()['choices'] == plain.json()['choices']


def test_max_completion_tokens_is_max_tokens_and_content_parts_are_joined(default_client):
  body = {k: v for k, v in BODIES['/v1/completions'].items() if k != 'max_tokens'}
  response = post(default_client, '/v1/completions', {**body, 'max_completion_tokens': 2, 'temperature': 0})
  assert response.json()['usage']['completion_tokens'] == 2  # greedy 'hello world' has no EOS early (test_serve)
  chat = dict(BODIES['/v1/chat/completions'], temperature=0)
  parts = [{'type': 'text', 'text': 'h'}, {'type': 'text', 'text': 'i'}]
  joined = post(default_client, '/v1/chat/completions', dict(chat, messages=[{'role': 'user', 'content': parts}]))
  assert joined.status_code == 200 and joined.json() | {'id': 0, 'created': 0} == (
      post(default_client, '/v1/chat/completions', chat).json() | {'id': 0, 'created': 0})


# ---- limits ----

@pytest.mark.parametrize('path, body, status, param, code', [
    ('/v1/completions', dict(model='tiny', prompt='x' * 5000), 413, None, 'request_too_large'),
    ('/v1/completions', dict(model='tiny', prompt='a', extra=[[[[[[[[1]]]]]]]]), 400, 'extra' + '[0]' * 7,
     'too_deeply_nested'),
    ('/v1/completions', dict(model='tiny', prompt='x' * 31), 400, 'prompt', 'prompt_too_long'),
    ('/v1/completions', dict(model='tiny', prompt=[5] * 25, max_tokens=2), 400, 'prompt', 'context_length_exceeded'),
    ('/v1/completions', dict(model='tiny', prompt='a', stop=['a', 'b', 'c']), 400, 'stop', None),
    ('/v1/completions', dict(model='tiny', prompt='a', stop='123456789'), 400, 'stop', None),
    ('/v1/chat/completions', dict(model='tiny', messages=[{'role': 'user', 'content': 'a'}] * 5), 400, 'messages',
     'too_many_messages'),
    ('/v1/chat/completions', dict(model='tiny', messages=[{'role': 'user', 'content': 'x' * 16}] * 2), 400,
     'messages', 'prompt_too_long'),
])
def test_limits_answer_4xx_naming_the_field(tight_client, path, body, status, param, code):
  assert_openai_error(post(tight_client, path, body), status, param=param, code=code)
  assert_serving(tight_client)


def test_a_body_larger_than_declared_is_cut_off(tight_client):
  # Chunked upload (no Content-Length): the server stops reading at max_body_bytes.
  chunks = (b'{"model": "tiny", "prompt": "' + b'x' * 1000 for _ in range(10))
  response = tight_client.post('/v1/completions', content=chunks, headers={'Content-Type': 'application/json', **AUTH})
  assert_openai_error(response, 413, code='request_too_large')


@pytest.mark.parametrize('raw, param', [
    (b'{"model": "tiny", "prompt": "a", "temperature": NaN}', None),
    (b'{"model": "tiny", "prompt": "a", "temperature": Infinity}', None),
    (b'{"model": "tiny", "prompt": "a", "temperature": 1e999}', 'temperature'),
    (b'{"model": "tiny", "prompt": "a", "top_p": -1e999}', 'top_p'),
    (b'{"model": "tiny", "prompt": "a", "max_tokens": 1e999}', 'max_tokens'),
    (b'{"model": "tiny", "prompt": "a", "temperature": 1' + b'0' * 400 + b'}', 'temperature'),
    (b'{"model": "tiny", "prompt": "a", "max_tokens": 1' + b'0' * 400 + b'}', 'max_tokens'),
    (b'{"model": "tiny", "prompt": "a", "seed": 1' + b'0' * 5000 + b'}', None),  # past Python's int parse limit
    (b'{"model": "tiny", "prompt": "a", "temperature": 1e39}', None),  # finite, but inf in float32
    (b'{"model": "tiny", "prompt": [1, 2, 99999]}', 'prompt'),
    (b'\xff\xfe{}', None),
])
def test_numbers_and_bytes_json_allows_but_the_engine_cannot_take(default_client, raw, param):
  assert_openai_error(post(default_client, '/v1/completions', raw), 400, param=param)
  assert_serving(default_client)


def test_default_limits_are_sane():
  limits = limits_lib.Limits()
  assert limits.prompt_tokens(4096) == 4095 and limits.max_json_depth >= 8
  with pytest.raises(ValueError, match='max_body_bytes'):
    limits_lib.Limits(max_body_bytes=0)
  with pytest.raises(ValueError, match='request_timeout'):
    limits_lib.Limits(request_timeout=-1)


# ---- request ids, timeouts, health ----

def test_request_ids_are_echoed_and_name_the_completion(default_client, caplog):
  with caplog.at_level('INFO', logger='dsjax.serve'):
    response = post(default_client, '/v1/completions', dict(model='tiny', prompt='a', max_tokens=2),
                    headers={'X-Request-Id': 'trace-42'})
  assert response.headers['x-request-id'] == 'trace-42' and response.json()['id'] == 'cmpl-trace-42'
  assert any('trace-42' in r.getMessage() and 'completion 2 tokens' in r.getMessage() for r in caplog.records)
  # An unusable id (spaces, too long) is replaced by a fresh one; every response has one, errors included.
  for given in ('has spaces', 'x' * 200):
    response = post(default_client, '/v1/completions', dict(model='tiny', prompt='a', max_tokens=1),
                    headers={'X-Request-Id': given})
    assert response.headers['x-request-id'] != given and len(response.headers['x-request-id']) == 24
  assert post(default_client, '/v1/completions', b'{').headers['x-request-id']


def test_a_request_past_request_timeout_gets_504(engine, monkeypatch):
  decode = test_engine_failures.slow_steps(engine, monkeypatch, 0.03)
  app = serve_api.create_app(engine, TOKENIZER, 'tiny', api_key=KEY, max_len=MAX_LEN,
                             limits=limits_lib.Limits(request_timeout=0.3))
  with TestClient(app) as client:
    # Greedy 'hello world' has no EOS in its first 10 tokens (test_serve): 10 steps alone take 0.3 s.
    body = dict(model='tiny', prompt='hello world', max_tokens=30, temperature=0)
    assert_openai_error(post(client, '/v1/completions', body), 504, code='request_timeout')
    stream = post(client, '/v1/completions', {**body, 'stream': True})
    events = [line[len('data: '):] for line in stream.text.splitlines() if line.startswith('data: ')]
    assert events[-1] == '[DONE]' and json.loads(events[-2])['error']['code'] == 'request_timeout'
    monkeypatch.setattr(engine, '_decode', decode)
    assert_serving(client)


def test_health_is_503_once_the_engine_cannot_serve():
  model, params, _ = test_engine.shared_model()
  engine = engine_lib.Engine(model, params, num_slots=1, max_len=MAX_LEN, vocab_limit=TOKENIZER.vocab_size)
  with TestClient(serve_api.create_app(engine, TOKENIZER, 'tiny', api_key=KEY, max_len=MAX_LEN)) as client:
    ok = client.get('/health').json()
    assert ok['status'] == 'ok' and ok['thread_alive'] and ok['error'] is None
    engine.shutdown(cancel=True)
    down = client.get('/health')
    assert down.status_code == 503 and down.json()['status'] == 'error' and not down.json()['thread_alive']
    assert_openai_error(post(client, '/v1/completions', dict(model='tiny', prompt='a')), 503, code='shutting_down')


# ---- client disconnects (a real socket) ----

@contextlib.contextmanager
def slow_server(engine, monkeypatch):
  """The app on a real port over `engine` whose decode steps take 20 ms each; yields (host, port)."""
  decode = test_engine_failures.slow_steps(engine, monkeypatch, 0.02)
  with test_serve.serving(serve_api.create_app(engine, TOKENIZER, 'tiny', api_key=KEY, max_len=MAX_LEN)) as url:
    host, port = url.rsplit('/', 1)[1].split(':')
    yield host, int(port)
  monkeypatch.setattr(engine, '_decode', decode)


def spy_on_submit(engine, monkeypatch):
  """The engine requests the app submits, in order (the real submit runs)."""
  submitted, submit = [], engine.submit

  def spy(*args, **kwargs):
    submitted.append(submit(*args, **kwargs))
    return submitted[-1]

  monkeypatch.setattr(engine, 'submit', spy)
  return submitted


def send(host, port, body):
  sock = socket.create_connection((host, port), timeout=30)
  data = json.dumps(body).encode()
  sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
               + f'Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n'.encode() + data)
  return sock


@pytest.mark.parametrize('stream', [True, False])
def test_a_client_that_disconnects_frees_its_slot(engine, monkeypatch, stream):
  submitted = spy_on_submit(engine, monkeypatch)
  with slow_server(engine, monkeypatch) as (host, port):
    sock = send(host, port, dict(model='tiny', prompt='a', max_tokens=40, temperature=0, stream=stream))
    deadline = time.time() + 30
    while not (submitted and submitted[0].tokens) and time.time() < deadline:
      time.sleep(0.01)
    assert submitted and submitted[0].tokens, 'the request never started'
    if stream:
      assert sock.recv(1 << 16).startswith(b'HTTP/1.1 200')
    sock.close()
    request = submitted[0]
    assert request.wait(5), 'the disconnected request kept its slot'
    assert request.finish_reason == 'cancelled' and len(request.tokens) < 40
    stats_deadline = time.time() + 5
    while engine.stats()['active'] and time.time() < stats_deadline:
      time.sleep(0.01)
    assert engine.stats()['active'] == 0


# ---- fuzzing ----

# Text from all of Unicode, lone surrogates included, with the characters that break things drawn often.
_TRICKY = ['\ud800', '\udfff', '\x00', '\u2028', '\ufeff', '\U0001F600', '"', '\\', '<', '\n']
# (A list joined, not st.text: hypothesis merges a one_of alphabet into one uniform range of code points.)
_TEXT = st.lists(st.sampled_from(_TRICKY) | st.characters(exclude_categories=[]), max_size=12).map(''.join)
_SCALARS = (st.none() | st.booleans() | st.integers() | st.sampled_from([2**31, 2**63, -2**63, 10**30, -1, 0])
            | st.floats(allow_nan=True, allow_infinity=True) | _TEXT)
_JSON = st.recursive(_SCALARS, lambda children: st.lists(children, max_size=3)
                     | st.dictionaries(_TEXT, children, max_size=3), max_leaves=8)
_SMALL_INTS = st.integers(min_value=-2, max_value=8)
_MESSAGE = st.fixed_dictionaries({'role': st.sampled_from(['system', 'user', 'assistant', 'developer', 'tool']) | _JSON,
                                  'content': _TEXT | st.lists(st.fixed_dictionaries(
                                      {'type': st.just('text') | _TEXT, 'text': _TEXT | _JSON}), max_size=2) | _JSON})
_COMMON = {
    'model': st.just('tiny') | _JSON,
    'max_tokens': _SMALL_INTS | _JSON,
    'max_completion_tokens': _SMALL_INTS | _JSON,
    'temperature': st.floats(min_value=-1, max_value=3) | _JSON,
    'top_p': st.floats(min_value=-0.5, max_value=1.5) | _JSON,
    'top_k': st.integers() | _JSON,
    'seed': st.integers() | _JSON,
    'stop': _TEXT | st.lists(_TEXT, max_size=5) | _JSON,
    'stream': st.booleans() | _JSON,
    'stream_options': st.fixed_dictionaries({'include_usage': st.booleans() | _JSON}) | _JSON,
    'n': _SMALL_INTS | _JSON,
    'best_of': _SMALL_INTS | _JSON,
    'logprobs': st.none() | _JSON,
    'echo': st.booleans() | _JSON,
    'retrieval': st.fixed_dictionaries({'index': _TEXT, 'k': _SMALL_INTS}) | _JSON,
    'user': _TEXT,
}
_FIELDS = {
    '/v1/completions': {**_COMMON, 'prompt': _TEXT | st.lists(st.integers(min_value=-5, max_value=400), max_size=6)
                        | st.lists(_TEXT, max_size=2) | _JSON, 'suffix': _TEXT | _JSON},
    '/v1/chat/completions': {**_COMMON, 'messages': st.lists(_MESSAGE, max_size=3) | _JSON},
}
_HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xff), max_size=20)
_HEADERS = st.fixed_dictionaries({}, optional={
    'Content-Type': st.sampled_from(['application/json', 'text/plain', 'multipart/form-data']) | _HEADER_TEXT,
    'X-Request-Id': _HEADER_TEXT, 'Authorization': st.just(f'Bearer {KEY}') | _HEADER_TEXT,
    'Accept': _HEADER_TEXT, 'Content-Encoding': st.sampled_from(['gzip', 'br']) | _HEADER_TEXT})


_PLAIN_TEXT = st.text(max_size=12)  # no lone surrogates
_VALID_SETTINGS = {'temperature': st.floats(min_value=0, max_value=2), 'top_p': st.floats(min_value=0.01, max_value=1),
                   'top_k': st.integers(min_value=0, max_value=2**40), 'seed': st.integers(),
                   'stop': st.lists(st.text(min_size=1, max_size=3), max_size=2), 'stream': st.booleans(),
                   'stream_options': st.fixed_dictionaries({'include_usage': st.booleans()})}
_VALID = {
    '/v1/completions': st.fixed_dictionaries(
        {'model': st.just('tiny'), 'max_tokens': st.integers(min_value=1, max_value=6),
         'prompt': _PLAIN_TEXT | st.lists(st.integers(min_value=0, max_value=258), min_size=1, max_size=6)},
        optional=_VALID_SETTINGS),
    '/v1/chat/completions': st.fixed_dictionaries(
        {'model': st.just('tiny'), 'max_tokens': st.integers(min_value=1, max_value=6),
         'messages': st.lists(st.fixed_dictionaries({'role': st.sampled_from(['system', 'user', 'assistant']),
                                                     'content': _PLAIN_TEXT}), min_size=1, max_size=3)},
        optional=_VALID_SETTINGS),
}


def _bodies(path):
  """Bodies for `path`, as bytes: valid requests with up to 3 fields replaced by arbitrary values or dropped (so
  the engine path is reached), soups of the endpoint's fields (each present or not, plausible or arbitrary, plus
  unknown keys), arbitrary JSON values and arbitrary bytes."""
  fields = _FIELDS[path]
  names = sorted(fields)
  overrides = st.lists(st.sampled_from(names), max_size=3, unique=True).flatmap(
      lambda chosen: st.fixed_dictionaries({name: fields[name] for name in chosen}))
  mutated = st.tuples(_VALID[path], overrides, st.sets(st.sampled_from(names), max_size=1)).map(
      lambda t: {k: v for k, v in {**t[0], **t[1]}.items() if k not in t[2]})
  soup = st.fixed_dictionaries({}, optional=fields).flatmap(
      lambda d: st.dictionaries(_TEXT, _JSON, max_size=2).map(lambda extra: {**extra, **d}))
  as_bytes = lambda value: json.dumps(value).encode()
  nested = st.tuples(st.integers(min_value=1, max_value=5000), st.sampled_from([b'[]', b'{}', b'[]'])).map(
      lambda t: b'{"model": "tiny", "prompt": ' + t[1][:1] * t[0] + t[1][1:] * t[0] + b'}')
  return st.one_of(mutated.map(as_bytes), mutated.map(as_bytes), soup.map(as_bytes), _JSON.map(as_bytes),
                   st.binary(max_size=64), nested)


def _check(client, path, body, headers):
  headers = {name: value.encode('latin-1') for name, value in {'Authorization': f'Bearer {KEY}', **headers}.items()}
  response = client.post(path, content=body, headers=headers)  # bytes: any latin-1 header value goes out as is
  assert response.status_code < 500, (body, headers, response.text)
  if response.status_code >= 400:
    error = response.json()['error']
    assert set(error) == {'message', 'type', 'param', 'code'} and error['message'], (body, response.text)
    assert isinstance(error['type'], str) and (error['param'] is None or isinstance(error['param'], str))
  elif response.headers['content-type'].startswith('text/event-stream'):
    events = [line[len('data: '):] for line in response.text.splitlines() if line.startswith('data: ')]
    assert events[-1] == '[DONE]' and all('error' not in json.loads(e) for e in events[:-1]), response.text
  else:
    assert response.json()['choices'], response.text


@pytest.mark.parametrize('path', sorted(_FIELDS))
def test_fuzzed_requests_never_get_a_5xx(tight_client, default_client, path):
  for client in (tight_client, default_client):
    @settings(max_examples=FUZZ_EXAMPLES // 2, deadline=None, derandomize=not FUZZ_RANDOM, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=_bodies(path), headers=_HEADERS)
    def fuzz(body, headers):
      _check(client, path, body, headers)

    fuzz()
    assert_serving(client)
