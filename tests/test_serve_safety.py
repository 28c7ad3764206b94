"""dsjax/serve/safety.py: the output filter on its own (streams split anywhere) and wired into the server."""
import contextlib
import json
import os
import random
import re
import subprocess
import sys

import openai
import pytest

from dsjax.sample import engine as engine_lib
from dsjax.serve import api as serve_api
from dsjax.serve import chat as chat_lib
from dsjax.serve.safety import DEFAULT_REFUSAL, OutputFilter, SafetyConfig, load_safety_config
from tests import test_serve
from tests.sample import test_engine

TOKENIZER = test_serve.TOKENIZER
REFUSAL = '\n\n' + DEFAULT_REFUSAL  # after text released before the hit


def flag_if_contains_x(text: str) -> bool:
  """A classifier hook for the tests (imported by path, as serve.py's config would)."""
  return 'x' in text


def x_score(text: str) -> float:
  return min(1.0, text.count('x') / 2)


def length_score(text: str) -> float:
  return min(1.0, len(text) / 10)


def broken_hook(text: str) -> float:
  raise RuntimeError('model unavailable')


def run_filter(config, pieces):
  """(outputs of each push, then of finish) of one filter."""
  f = OutputFilter(config)
  return [f.push(p) for p in pieces] + [f.finish()], f


def filtered(config, text, chunk=None):
  """The filter's whole output for `text` pushed at once, or in pieces of `chunk` characters."""
  pieces = [text] if chunk is None else [text[i:i + chunk] for i in range(0, len(text), chunk)]
  return ''.join(run_filter(config, pieces)[0])


# ---- OutputFilter ----

def test_a_blocked_phrase_split_over_one_char_pushes_is_never_released():
  config = SafetyConfig(blocklist=('secret plan',))
  text = 'the Secret Plan is ready'
  outputs, f = run_filter(config, list(text))
  released = ''
  for i, out in enumerate(outputs[:-1]):
    released += out
    if i < len('the Secret Plan'):  # refused once the next character shows that the phrase is a whole word
      assert released == text[:min(i + 1, 4)], (i, released)  # never 'the S', nor 'the Secret Pla'
  assert released == 'the ' + REFUSAL and f.text == released and outputs[-1] == ''
  assert f.flagged and f.refused and f.reason == 'blocklist'
  assert f.push('more') == '' and f.finish() == ''  # after a refusal, nothing more


def test_blocklist_is_case_insensitive_and_matches_whole_words_only():
  config = SafetyConfig(blocklist=('class',), action='redact')
  text = 'Classify the subclass; a CLASS act, class.'
  expected = 'Classify the subclass; a [filtered] act, [filtered].'
  assert filtered(config, text) == filtered(config, text, chunk=1) == filtered(config, text, chunk=3) == expected
  assert filtered(config, 'my class') == 'my [filtered]'  # at the very end too
  f = OutputFilter(config)
  assert f.push('my class') == 'my '  # may still become "classy" or stay "class"
  assert f.push('y') == 'classy' and f.finish() == '' and not f.flagged
  f = OutputFilter(config)
  assert f.push('subclass') == 'subclass'  # no phrase can start inside a word: nothing held back


def test_longer_phrases_win_and_phrases_with_punctuation():
  config = SafetyConfig(blocklist=('bad', 'bad idea', 'c++'), action='redact')
  text = 'a bad idea, bad news, c++ or c+'
  assert filtered(config, text) == filtered(config, text, chunk=1) == 'a [filtered], [filtered] news, [filtered] or c+'


def test_patterns_redact_and_refuse():
  redact = SafetyConfig(patterns=(r'\d{3}-\d{4}',), action='redact', max_match_chars=8)
  text = 'call 555-1234 or 555-9876 now, not 55-1234'
  expected = 'call [filtered] or [filtered] now, not 55-1234'
  outputs, f = run_filter(redact, list(text))
  assert ''.join(outputs) == filtered(redact, text) == expected and f.redactions == 2 and not f.refused
  released = ''
  for out in outputs:  # streamed: only ever a prefix of the final text, never a digit of a number
    released += out
    assert expected.startswith(released)
  assert ''.join(outputs[:len('call 555-1234 or 5')]) == 'call [filtered]'  # released 8 characters behind
  refuse = SafetyConfig(patterns=(r'(?i)pass(word)?\s*[:=]',), refusal_message='[withheld]')
  outputs, f = run_filter(refuse, list('user: bob\npassword = hunter2'))
  assert ''.join(outputs) == 'user: bob\n\n\n[withheld]' and f.reason == 'pattern' and f.refused
  assert filtered(SafetyConfig(patterns=('hunter2',), refusal_message=''), 'pw hunter2') == 'pw '  # OpenAI's way


def test_a_greedy_pattern_is_decided_when_the_match_stops_growing():
  config = SafetyConfig(patterns=(r'\d+',), action='redact', max_match_chars=2)
  f = OutputFilter(config)
  assert f.push('a 12') == 'a ' and f.push('345') == '' and f.push(' b') == '[filtered]'
  assert f.finish() == ' b'


def test_streaming_in_any_pieces_gives_the_same_text():
  rng = random.Random(0)
  configs = [SafetyConfig(blocklist=('ab', 'b c'), patterns=('c{1,3}a', r'\.\.'), action=action, max_match_chars=6)
             for action in ('redact', 'refuse')]
  for _ in range(200):
    text = ''.join(rng.choice('abc .') for _ in range(rng.randint(0, 30)))
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, max(0, len(text) - 1)))) if len(text) > 1 else []
    pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    for config in configs:
      whole = filtered(config, text)
      outputs, _ = run_filter(config, pieces)
      assert ''.join(outputs) == whole == filtered(config, text, chunk=1), (text, pieces)
      released = ''
      for out in outputs:
        released += out
        assert whole.startswith(released)


def test_classifier_hook_by_import_path():
  config = SafetyConfig(classifier='tests.test_serve_safety:flag_if_contains_x')
  f = OutputFilter(config)
  assert f.push('Hello there') == ''  # not classified yet: held back
  assert f.push('. A') == 'Hello there.'  # a sentence end: classified and released
  assert f.push('n exa') == ''
  assert f.push('mple.\n') == REFUSAL and f.text == 'Hello there.' + REFUSAL
  assert f.refused and f.reason == 'classifier'
  # At least every classifier_chars characters, and at the finish; a score compares with the threshold.
  config = SafetyConfig(classifier='tests.test_serve_safety:x_score', classifier_threshold=1.0, classifier_chars=4,
                        action='redact')
  assert filtered(config, 'one x and more words') == 'one x and more words'
  outputs, f = run_filter(config, list('one x and x more'))
  assert ''.join(outputs) == 'one x an' + REFUSAL and f.refused  # checked at 'one x and x ': refused
  # A hook that fails flags the text (fail closed).
  config = SafetyConfig(classifier='tests.test_serve_safety:broken_hook')
  assert filtered(config, 'anything') == DEFAULT_REFUSAL


def test_bad_configs_say_what_is_wrong(tmp_path):
  with pytest.raises(ValueError, match=re.escape("'([a-z'")):
    SafetyConfig(patterns=('ok', '([a-z'))
  with pytest.raises(ValueError, match='empty string'):
    SafetyConfig(patterns=('x*',))
  with pytest.raises(ValueError, match='action'):
    SafetyConfig(action='block')
  with pytest.raises(ValueError, match='apply_to'):
    SafetyConfig(apply_to=('chat', 'embeddings'))
  with pytest.raises(ValueError, match='blocklist must be a list'):
    SafetyConfig(blocklist='word')
  with pytest.raises(ValueError, match='no_such_module'):
    SafetyConfig(classifier='no_such_module:fn')
  with pytest.raises(ValueError, match='package.module:function'):
    SafetyConfig(classifier='tests.test_serve_safety')
  with pytest.raises(FileNotFoundError, match='nowhere.json'):
    load_safety_config(str(tmp_path / 'nowhere.json'))
  path = tmp_path / 'safety.json'
  path.write_text(json.dumps({'blocklist': ['a'], 'block_list': ['b']}))
  with pytest.raises(ValueError, match="unknown key 'block_list'"):
    load_safety_config(str(path))
  path.write_text('{"blocklist": ')
  with pytest.raises(ValueError, match='not valid JSON'):
    load_safety_config(str(path))
  path.write_text(json.dumps({'blocklist': ['Bad Word'], 'patterns': [r'\d{16}'], 'action': 'redact',
                              'apply_to': ['chat', 'completion'], 'max_match_chars': 32}))
  assert load_safety_config(str(path)) == SafetyConfig(blocklist=('Bad Word',), patterns=(r'\d{16}',),
                                                       action='redact', apply_to=('chat', 'completion'),
                                                       max_match_chars=32)


def test_serve_py_rejects_a_bad_safety_config(tmp_path):
  path = tmp_path / 'safety.json'
  path.write_text(json.dumps({'patterns': ['(']}))
  proc = subprocess.run([sys.executable, 'serve.py', '--checkpoint=/nonexistent', f'--safety_config={path}'],
                        cwd=test_serve.ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.startswith('error: --safety_config: ') and "'('" in proc.stderr


# ---- the server ----

MESSAGES = [{'role': 'user', 'content': 'Hi'}]
MAX_TOKENS = 20


@contextlib.contextmanager
def serving(engine, safety):
  """An in-process uvicorn serving the tiny model as 'tiny' with `safety`; yields an openai client."""
  app = serve_api.create_app(engine, TOKENIZER, 'tiny', max_len=test_serve.MAX_LEN, safety=safety)
  with test_serve.serving(app) as url:
    yield openai.OpenAI(base_url=f'{url}/v1', api_key='unused', max_retries=0, timeout=120)


@pytest.fixture(scope='module')
def engine():
  model, params, _ = test_engine.shared_model()
  engine = engine_lib.Engine(model, params, num_slots=2, max_len=test_serve.MAX_LEN, max_queue=4,
                             vocab_limit=TOKENIZER.vocab_size)
  yield engine
  engine.shutdown(cancel=True)


@pytest.fixture(scope='module')
def unfiltered(engine):
  """The tiny model's greedy chat answer, served without a filter (the same as greedy decoding)."""
  with serving(engine, None) as c:
    result = c.chat.completions.create(model='tiny', messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
  text = result.choices[0].message.content
  assert result.choices[0].finish_reason == 'length'
  assert text == test_serve.expected_text(chat_lib.ChatFormatter(TOKENIZER)(MESSAGES), MAX_TOKENS)
  return text


def chat_both_ways(c):
  """(non-streamed response, streamed chunks) of the same greedy chat request."""
  kwargs = dict(model='tiny', messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
  return (c.chat.completions.create(**kwargs),
          list(c.chat.completions.create(**kwargs, stream=True, stream_options={'include_usage': True})))


def streamed_text(chunks):
  return ''.join(ch.choices[0].delta.content or '' for ch in chunks if ch.choices)


def blocked_span(text):
  """A 3-character span from the middle of `text`, occurring there first, and as a regex."""
  start = len(text) // 2
  while text.index(text[start:start + 3]) != start:
    start += 1
  return start, text[start:start + 3]


def test_chat_refused_mid_stream_the_same_both_ways(engine, unfiltered):
  start, span = blocked_span(unfiltered)
  safety = SafetyConfig(patterns=(re.escape(span),), max_match_chars=4, refusal_message='[refused]')
  with serving(engine, safety) as c:
    result, chunks = chat_both_ways(c)
    completion = c.completions.create(model='tiny', prompt=chat_lib.ChatFormatter(TOKENIZER)(MESSAGES),
                                      max_tokens=MAX_TOKENS, temperature=0)
  content = result.choices[0].message.content
  assert content == unfiltered[:start] + '\n\n[refused]' and span not in content
  assert result.choices[0].finish_reason == 'content_filter'
  assert 1 <= result.usage.completion_tokens <= MAX_TOKENS
  assert streamed_text(chunks) == content
  finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
  assert len(finals) == 1 and finals[0].choices[0].finish_reason == 'content_filter'
  assert chunks[-1].usage.completion_tokens >= 1
  assert sum(bool(ch.choices and ch.choices[0].delta.content) for ch in chunks) > 1  # text came before the end
  assert completion.choices[0].text == unfiltered and completion.choices[0].finish_reason == 'length'  # chat only


def test_chat_redacted_and_completions_when_asked(engine, unfiltered):
  start, span = blocked_span(unfiltered)
  safety = SafetyConfig(patterns=(re.escape(span),), action='redact', apply_to=('chat', 'completion'))
  with serving(engine, safety) as c:
    result, chunks = chat_both_ways(c)
    completion = c.completions.create(model='tiny', prompt=chat_lib.ChatFormatter(TOKENIZER)(MESSAGES),
                                      max_tokens=MAX_TOKENS, temperature=0)
  expected = re.sub(re.escape(span), '[filtered]', unfiltered)
  assert result.choices[0].message.content == streamed_text(chunks) == expected == completion.choices[0].text
  assert result.choices[0].finish_reason == completion.choices[0].finish_reason == 'length'


def test_chat_blocklist_word_and_a_filter_that_finds_nothing(engine, unfiltered):
  words = [m for m in re.finditer(r'(?<!\w)\w{2,}(?!\w)', unfiltered) if m.start() > 0]
  assert words, unfiltered  # the tiny model's answer has a whole word to block
  word = words[0]
  with serving(engine, SafetyConfig(blocklist=(word.group().swapcase(),))) as c:
    result, chunks = chat_both_ways(c)
  assert result.choices[0].message.content == streamed_text(chunks) == unfiltered[:word.start()] + REFUSAL
  assert result.choices[0].finish_reason == chunks[-2].choices[0].finish_reason == 'content_filter'
  with serving(engine, SafetyConfig(blocklist=('never said',), patterns=('nor this',))) as c:
    result, chunks = chat_both_ways(c)
  assert result.choices[0].message.content == streamed_text(chunks) == unfiltered
  assert result.choices[0].finish_reason == 'length'


def test_chat_classifier_refuses_the_same_both_ways(engine, unfiltered):
  safety = SafetyConfig(classifier='tests.test_serve_safety:length_score', classifier_chars=5)  # flags 5+ chars
  with serving(engine, safety) as c:
    result, chunks = chat_both_ways(c)
  content = result.choices[0].message.content
  assert streamed_text(chunks) == content and content.endswith(DEFAULT_REFUSAL)
  assert unfiltered.startswith(content[:-len(DEFAULT_REFUSAL)].removesuffix('\n\n'))
  assert result.choices[0].finish_reason == chunks[-2].choices[0].finish_reason == 'content_filter'
