"""serve.py: the OpenAI-compatible server, talked to with the official `openai` client and raw HTTP."""
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import uvicorn

from dsjax.data import tokenizer as tokenizer_lib
from dsjax.sample import engine as engine_lib
from dsjax.sample import sampler as sampler_lib
from dsjax.serve import api as serve_api
from dsjax.serve import chat as chat_lib
from tests.model import helpers
from tests.sample import test_engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LEN = test_engine.MAX_LEN
KEY = 'secret-key'
TOKENIZER = tokenizer_lib.load_tokenizer('byte')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def serving(app):
  """Serves `app` with an in-process uvicorn on a free port; yields the base URL."""
  port = free_port()
  uv = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=port, log_level='warning'))
  thread = threading.Thread(target=uv.run, daemon=True)
  thread.start()
  deadline = time.time() + 30
  while not uv.started and time.time() < deadline:
    time.sleep(0.05)
  assert uv.started
  try:
    yield f'http://127.0.0.1:{port}'
  finally:
    uv.should_exit = True
    thread.join(15)
  assert not thread.is_alive()


@pytest.fixture(scope='module')
def server():
  """(base_url, engine): an in-process uvicorn on a free port, serving the tiny model as 'tiny'."""
  model, params, _ = test_engine.shared_model()
  engine = engine_lib.Engine(model, params, num_slots=3, max_len=MAX_LEN, max_queue=4,
                             vocab_limit=TOKENIZER.vocab_size)
  with serving(serve_api.create_app(engine, TOKENIZER, 'tiny', api_key=KEY, max_len=MAX_LEN)) as url:
    yield url, engine
  engine.shutdown(cancel=True)


def client(server, key=KEY) -> openai.OpenAI:
  return openai.OpenAI(base_url=f'{server[0]}/v1', api_key=key, max_retries=0, timeout=120)


def raw(server, path, body=None, key=KEY):
  """(status, parsed JSON) of a raw request; body: bytes or a JSON-able object (None: GET)."""
  data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
  headers = {'Content-Type': 'application/json'}
  if key:
    headers['Authorization'] = f'Bearer {key}'
  method = 'GET' if data is None else 'POST'
  request = urllib.request.Request(server[0] + path, data=data, headers=headers, method=method)
  try:
    with urllib.request.urlopen(request, timeout=120) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


PROMPT = 'hello world'  # 12 tokens with BOS; the random model's greedy continuation has no EOS and no stop in it


def expected_text(ids, max_new):
  """What greedy decoding of the prompt ids alone (Sampler.generate) gives, stopping at EOS, as text."""
  reference = test_engine.shared_model()[2]
  return TOKENIZER.decode(reference(ids, max_new, stop_ids=(TOKENIZER.eos_id,)))


def ids_of(text):
  return [TOKENIZER.bos_id] + TOKENIZER.encode(text).tolist()


def test_models_and_health(server):
  assert [m.id for m in client(server).models.list().data] == ['tiny']
  assert raw(server, '/health', key=None)[1]['status'] == 'ok'


def test_completion_and_streaming_match_unbatched_greedy(server):
  c = client(server)
  result = c.completions.create(model='tiny', prompt=PROMPT, max_tokens=10, temperature=0)
  assert result.choices[0].text == expected_text(ids_of(PROMPT), 10)
  assert result.usage.prompt_tokens == 12 and result.usage.completion_tokens == 10
  assert result.choices[0].finish_reason == 'length'
  chunks = list(c.completions.create(model='tiny', prompt=PROMPT, max_tokens=10, temperature=0, stream=True))
  assert ''.join(ch.choices[0].text for ch in chunks) == result.choices[0].text
  assert chunks[-1].choices[0].finish_reason == result.choices[0].finish_reason


def test_chat_uses_the_template_and_streams(server):
  c = client(server)
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
  ids = chat_lib.ChatFormatter(TOKENIZER)(messages)
  assert TOKENIZER.decode(ids) == 'System: Be brief.\n\nUser: Hi\n\nAssistant:'
  chat = c.chat.completions.create(model='tiny', messages=messages, max_tokens=6, temperature=0)
  plain = c.completions.create(model='tiny', prompt=ids, max_tokens=6, temperature=0)
  assert chat.choices[0].message.content == plain.choices[0].text
  assert chat.choices[0].message.role == 'assistant' and chat.usage.prompt_tokens == len(ids)
  stream = c.chat.completions.create(model='tiny', messages=messages, max_tokens=6, temperature=0, stream=True,
                                     stream_options={'include_usage': True})
  chunks = list(stream)
  assert ''.join(ch.choices[0].delta.content or '' for ch in chunks if ch.choices) == chat.choices[0].message.content
  assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_chat_template_from_the_tokenizer_config(tmp_path):
  template = ('{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% if m.role == "assistant" %}'
              '{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}')
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'chat_template': [{'name': 'default',
                                                                                 'template': template}]}))
  assert chat_lib.read_chat_template(str(tmp_path)) == template
  messages = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'},
              {'role': 'user', 'content': '?'}]
  ids = chat_lib.ChatFormatter(TOKENIZER, template)(messages)  # the byte tokenizer names no special tokens
  assert ids == ids_of('<|user|>hi<|assistant|>yo<|user|>?<|assistant|>')
  hf = tokenizer_lib.train_bpe(['hello world'] * 4, 300, tmp_path / 'tokenizer.json')
  ids = chat_lib.ChatFormatter(hf, template)(messages)  # bos/eos strings in the rendered text become their ids
  assert ids[0] == hf.bos_id and ids.count(hf.bos_id) == 1 and ids.count(hf.eos_id) == 1
  assert hf.decode(ids) == '<|user|>hi<|assistant|>yo<|user|>?<|assistant|>'


def test_chat_history_is_truncated_from_the_oldest_turns(server):
  c = client(server)
  system = {'role': 'system', 'content': 'S'}
  messages = [system, {'role': 'user', 'content': 'x' * 20}, {'role': 'assistant', 'content': 'y' * 20},
              {'role': 'user', 'content': 'ok'}]
  result = c.chat.completions.create(model='tiny', messages=messages, max_tokens=4, temperature=0)
  assert result.usage.prompt_tokens == len(chat_lib.ChatFormatter(TOKENIZER)([system, messages[-1]]))
  with pytest.raises(openai.BadRequestError):  # the last message alone does not fit
    c.chat.completions.create(model='tiny', messages=[system, {'role': 'user', 'content': 'z' * 60}], max_tokens=4)


def test_stop_strings(server):
  c = client(server)
  full = c.completions.create(model='tiny', prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
  stop = full[1:3]
  assert len(stop) == 2 and full.index(stop) == 1
  got = c.completions.create(model='tiny', prompt=PROMPT, max_tokens=10, temperature=0, stop=[stop, 'never'])
  assert got.choices[0].text == full[:1] and got.choices[0].finish_reason == 'stop'
  streamed = c.completions.create(model='tiny', prompt=PROMPT, max_tokens=10, temperature=0, stop=stop, stream=True)
  assert ''.join(ch.choices[0].text for ch in streamed) == got.choices[0].text


def test_text_stream_holds_back_partial_characters_and_stop_strings():
  text = serve_api.TextStream(TOKENIZER, ['<end>'])
  pieces = [text.push(t) for t in 'a€ <en'.encode() + b'<end>tail']
  assert '\ufffd' not in ''.join(pieces) and ''.join(pieces) == 'a€ <en' and text.stopped
  text = serve_api.TextStream(TOKENIZER, ['<end>'])
  pieces = [text.push(t) for t in b'x <en'] + [text.push(None)]
  assert pieces[-1] == '<en' and ''.join(pieces) == 'x <en'


@pytest.mark.parametrize('path, body, key, status, param', [
    ('/v1/completions', b'{"model": "tiny", "prompt": ', KEY, 400, None),
    ('/v1/completions', b'[1, 2]', KEY, 400, None),
    ('/v1/completions', dict(prompt='a'), KEY, 400, 'model'),
    ('/v1/completions', dict(model='tiny'), KEY, 400, 'prompt'),
    ('/v1/completions', dict(model='tiny', prompt='a', max_tokens=0), KEY, 400, 'max_tokens'),
    ('/v1/completions', dict(model='tiny', prompt='a', max_tokens='5'), KEY, 400, 'max_tokens'),
    ('/v1/completions', dict(model='tiny', prompt='a', temperature=-0.5), KEY, 400, 'temperature'),
    ('/v1/completions', dict(model='tiny', prompt='a', top_p=0), KEY, 400, 'top_p'),
    ('/v1/completions', dict(model='tiny', prompt='a', top_p=1.5), KEY, 400, 'top_p'),
    ('/v1/completions', dict(model='tiny', prompt='a', n=2), KEY, 400, 'n'),
    ('/v1/completions', dict(model='tiny', prompt='x' * MAX_LEN), KEY, 400, 'prompt'),
    ('/v1/completions', dict(model='tiny', prompt='x' * 40, max_tokens=20), KEY, 400, 'max_tokens'),
    ('/v1/chat/completions', dict(model='tiny', messages=[]), KEY, 400, 'messages'),
    ('/v1/chat/completions', dict(model='tiny', messages=[{'role': 'robot', 'content': 'a'}]), KEY, 400, 'messages'),
    ('/v1/completions', dict(model='gpt-4', prompt='a'), KEY, 404, 'model'),
    ('/v1/nothing', dict(model='tiny'), KEY, 404, None),
    ('/v1/completions', dict(model='tiny', prompt='a'), None, 401, None),
    ('/v1/completions', dict(model='tiny', prompt='a'), 'wrong', 401, None),
    ('/v1/models', None, 'wrong', 401, None),
])
def test_errors_have_the_openai_shape_and_the_server_keeps_serving(server, path, body, key, status, param):
  got_status, got = raw(server, path, body, key)
  assert got_status == status, got
  assert set(got['error']) == {'message', 'type', 'param', 'code'} and got['error']['message']
  assert got['error']['param'] == param
  assert raw(server, '/v1/completions', dict(model='tiny', prompt='a', max_tokens=1))[0] == 200


def test_client_errors_map_to_openai_exceptions(server):
  with pytest.raises(openai.AuthenticationError):
    client(server, key='wrong').models.list()
  with pytest.raises(openai.NotFoundError):
    client(server).completions.create(model='nope', prompt='a')


def test_queue_full_answers_429(server):
  engine = server[1]
  hogs = []
  with pytest.raises(engine_lib.QueueFull):
    for _ in range(20):
      hogs.append(engine.submit([1, 2, 3], MAX_LEN - 3))
  status, body = raw(server, '/v1/completions', dict(model='tiny', prompt='a', max_tokens=2))
  for hog in hogs:
    hog.cancel()
  assert status == 429 and body['error']['code'] == 'queue_full'
  assert all(hog.wait(30) for hog in hogs)
  assert raw(server, '/v1/completions', dict(model='tiny', prompt='a', max_tokens=1))[0] == 200


def test_concurrent_clients_match_unbatched_greedy(server):
  texts = ['abc', 'hello world', 'the quick brown fox!', 'abcd', 'xyz']  # 4, 12, 20 tokens with BOS

  def ask(text):
    return client(server).completions.create(model='tiny', prompt=text, max_tokens=10, temperature=0).choices[0].text

  with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
    got = list(pool.map(ask, texts))
  assert got == [expected_text(ids_of(t), 10) for t in texts]


@pytest.fixture(scope='module')
def checkpoint_dir(tmp_path_factory):
  """The tiny model saved as a dsjax checkpoint named tiny-ckpt (byte tokenizer, max_positions 128)."""
  from dsjax import checkpoint  # pylint: disable=g-import-not-at-top
  model, params, _ = test_engine.shared_model()
  cfg = helpers.base_config()
  cfg.model = model.cfg
  cfg.data.tokenizer = 'byte'
  cfg.data.seq_len = 64
  path = tmp_path_factory.mktemp('serve') / 'tiny-ckpt'
  checkpoint.save_model(str(path), cfg, params)
  return path


def run_cli(*args):
  """(exit status, stdout, stderr) of `python ARGS` in the repo root on CPU."""
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
                        capture_output=True, text=True, timeout=120)
  return proc.returncode, proc.stdout, proc.stderr


def test_serve_py_answers_and_exits_on_sigterm(checkpoint_dir):
  # With speculative decoding (prompt lookup) in the engine: greedy answers still equal plain greedy decoding.
  # --port=0: the server picks a free port and its "serving" line names it, printed once the socket listens.
  proc = subprocess.Popen(
      [sys.executable, 'serve.py', f'--checkpoint={checkpoint_dir}', '--port=0', '--num_slots=2',
       f'--max_len={MAX_LEN}', '--draft=lookup', '--gamma=3'], cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    assert line.startswith('serving tiny-ckpt on http://127.0.0.1:'), (line, proc.stderr.read() if not line else '')
    assert 'KV blocks of 16 tokens' in line  # the paged engine is the default
    port = int(line.split('http://127.0.0.1:')[1].split('/')[0])
    assert port != 0
    base = (f'http://127.0.0.1:{port}',)
    assert raw(base, '/health', key=None)[0] == 200  # no retry: the socket listens before the line is printed
    c = openai.OpenAI(base_url=f'{base[0]}/v1', api_key='unused', max_retries=0, timeout=60)
    assert [m.id for m in c.models.list().data] == ['tiny-ckpt']
    result = c.completions.create(model='tiny-ckpt', prompt=PROMPT, max_tokens=10, temperature=0)
    assert result.choices[0].text == expected_text(ids_of(PROMPT), 10)
    stream = c.completions.create(model='tiny-ckpt', prompt=PROMPT, max_tokens=30, temperature=0, stream=True)
    next(iter(stream))  # a request in flight while the server is told to stop
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM), proc.stderr.read()
    assert 'Traceback' not in proc.stderr.read()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def test_serve_py_refuses_a_bad_or_busy_port_before_loading(checkpoint_dir):
  status, out, err = run_cli('serve.py', f'--checkpoint={checkpoint_dir}', '--port=99999')
  assert status == 2 and 'serving' not in out and '--port=99999: must be in 1-65535' in err
  with socket.socket() as busy:
    busy.bind(('127.0.0.1', 0))
    busy.listen()
    port = busy.getsockname()[1]
    status, out, err = run_cli('serve.py', f'--checkpoint={checkpoint_dir}', f'--port={port}')
  assert status == 2 and 'serving' not in out and f'cannot listen on 127.0.0.1:{port}' in err
  assert 'Traceback' not in err


def test_sample_py_refuses_to_generate_past_the_context(checkpoint_dir):
  # max_positions is 128 (tests/model/helpers.tiny_config); the prompt 'def ' is 5 tokens with BOS.
  status, out, err = run_cli('sample.py', f'--checkpoint={checkpoint_dir}', '--prompt=def ', '--max_new_tokens=124')
  assert status == 2 and out == '' and 'exceeds the model\'s context (model.max_positions=128)' in err, err
  assert 'Traceback' not in err
  cfg = test_engine.shared_model()[0].cfg  # the boundary itself: 128 positions fit, 129 do not
  sampler_lib.check_context(cfg, 128, 'prompt + new tokens')
  with pytest.raises(ValueError, match='129 tokens exceeds'):
    sampler_lib.check_context(cfg, 129, 'prompt + new tokens')
