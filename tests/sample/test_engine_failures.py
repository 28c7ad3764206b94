"""The engine survives bad requests and device failures: settings are checked and clamped at submit, a failure stays
with its request, consumed device state is rebuilt, and repeated failures end the engine with an honest health().

Failures are injected by wrapping the engine's jitted device functions (the real ones run; the wrapper raises at a
chosen call), and every surviving request is compared with `Sampler.generate` of its prompt alone."""
import threading
import time

import pytest

from dsjax.sample import engine as engine_lib
from tests.sample.test_engine import MAX_LEN, VOCAB_LIMIT, prompt_of, shared_model


@pytest.fixture(scope='module')
def setup():
  model, params, reference = shared_model()
  engine = engine_lib.Engine(model, params, num_slots=2, max_len=MAX_LEN, max_queue=8, vocab_limit=VOCAB_LIMIT)
  yield engine, reference
  engine.shutdown(cancel=True)


def slow_steps(engine, monkeypatch, seconds):
  """Makes each decode step of `engine` take `seconds` longer (undone by monkeypatch); returns the real step."""
  decode = engine._decode

  def slow_decode(*args, **kwargs):
    time.sleep(seconds)
    return decode(*args, **kwargs)

  monkeypatch.setattr(engine, '_decode', slow_decode)
  return decode


def healthy(engine):
  health = engine.health()
  return health['ok'] and health['thread_alive'] and health['error'] is None


def test_out_of_range_settings_are_brought_into_the_device_dtypes(setup):
  engine, reference = setup
  prompt = prompt_of(6)
  sampled = dict(temperature=1.0, top_p=1.0)
  # top_k past int32 or the vocabulary: no top-k filtering at all (issue 18: 10**12 killed the engine thread).
  assert engine.generate(prompt, 8, top_k=10**12, seed=5, **sampled) == reference(prompt, 8, seed=5, top_k=0,
                                                                                  **sampled)
  # Seeds are taken modulo 2**32 as jax.random.key does; 2**70 is past int64.
  assert engine.generate(prompt, 8, seed=2**40 + 3, **sampled) == reference(prompt, 8, seed=3, **sampled)
  assert engine.generate(prompt, 8, seed=2**70, **sampled) == reference(prompt, 8, seed=0, **sampled)
  # A temperature whose 1 / T overflows float32 logits is greedy.
  assert engine.generate(prompt, 8, temperature=1e-30, seed=1) == reference(prompt, 8)
  # max_new_tokens far past the context: stops at max_len.
  request = engine.submit(prompt, 10**15)
  assert len(request.result(60)) == MAX_LEN - len(prompt) and request.finish_reason == 'length'
  assert healthy(engine)


@pytest.mark.parametrize('args, kwargs, message', [
    (([1, 2], 4), dict(temperature=float('inf')), 'temperature'),
    (([1, 2], 4), dict(temperature=float('nan')), 'temperature'),
    (([1, 2], 4), dict(temperature=1e39), 'temperature'),  # finite in float64, inf in float32
    (([1, 2], 4), dict(top_p=float('nan')), 'top_p'),
    (([1, 2], 4), dict(top_k=-1), 'top_k'),
    (([1, 2], 4), dict(top_k=2.5), 'top_k'),
    (([1, 2], 4), dict(seed='7'), 'seed'),
    (([1, 2], 4), dict(stop_ids=['x']), 'stop_ids'),
    (([1, 2], 4), dict(timeout=0), 'timeout'),
    (([1, 10**6], 4), {}, 'vocabulary'),
    (([-1], 4), {}, 'vocabulary'),
    (([1, True], 4), {}, 'prompt_ids'),
    (([1], 2.0), {}, 'max_new_tokens'),
])
def test_bad_settings_raise_value_error_naming_them(setup, args, kwargs, message):
  with pytest.raises(ValueError, match=message):
    setup[0].submit(*args, **kwargs)


def test_a_failing_admission_fails_its_request_alone(setup, monkeypatch):
  engine, reference = setup
  prefill = engine._prefill
  poison = prompt_of(9, offset=4)

  def failing_prefill(params, cache, last, slot, tokens, length):
    if int(length) == len(poison):
      raise OverflowError('injected: bad request')  # before the call: the device state is intact
    return prefill(params, cache, last, slot, tokens, length)

  monkeypatch.setattr(engine, '_prefill', failing_prefill)
  good = [engine.submit(prompt_of(n, offset=n), 12) for n in (5, 7)]
  bad = engine.submit(poison, 12)
  later = engine.submit(prompt_of(11), 12)
  assert bad.wait(60) and bad.finish_reason == 'error' and isinstance(bad.error, OverflowError)
  for request in good + [later]:
    assert request.result(60) == reference(request.prompt_ids, 12)
  assert engine.restarts == 0 and healthy(engine)


def test_a_failure_that_consumed_the_cache_rebuilds_it(setup, monkeypatch):
  engine, reference = setup
  decode = engine._decode
  calls = []

  def decode_then_fail(*args, **kwargs):
    out = decode(*args, **kwargs)  # donates (consumes) the batch cache and the logits
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError('injected: device failure after donation')
    return out

  monkeypatch.setattr(engine, '_decode', decode_then_fail)
  restarts = engine.restarts
  victims = [engine.submit(prompt_of(n, offset=1), 20) for n in (4, 6)]
  queued = engine.submit(prompt_of(8, offset=2), 10)  # waits for a slot: not in flight when the step fails
  for victim in victims:
    assert victim.wait(60) and victim.finish_reason == 'error'
    assert isinstance(victim.error, RuntimeError) and 'injected' in str(victim.error)
  assert 0 < len(victims[0].tokens) < 20
  assert queued.result(60) == reference(queued.prompt_ids, 10)  # served from the rebuilt cache
  assert engine.restarts == restarts + 1 and healthy(engine)
  assert engine.generate(prompt_of(5), 10) == reference(prompt_of(5), 10)


def test_a_request_past_its_deadline_times_out(setup, monkeypatch):
  engine, reference = setup
  slow_steps(engine, monkeypatch, 0.02)
  request = engine.submit(prompt_of(4), MAX_LEN - 4, timeout=0.2)
  other = engine.submit(prompt_of(5), 6)
  assert request.wait(30) and request.finish_reason == 'timeout'
  assert len(request.tokens) < MAX_LEN - 4
  assert other.result(30) == reference(prompt_of(5), 6)


def test_repeated_failures_end_the_engine_and_health_says_so():
  model, params, _ = shared_model()
  fatal = []
  called = threading.Event()

  def on_fatal(error):
    fatal.append(error)
    called.set()

  engine = engine_lib.Engine(model, params, num_slots=1, max_len=MAX_LEN, max_queue=8, vocab_limit=VOCAB_LIMIT,
                             on_fatal=on_fatal)
  assert healthy(engine) and engine.health()['last_step_s'] is None

  def broken(*args, **kwargs):
    raise RuntimeError('injected: the device is gone')

  engine._decode = broken
  requests = [engine.submit(prompt_of(4 + i), 4) for i in range(engine_lib.MAX_CONSECUTIVE_FAILURES + 2)]
  assert called.wait(60)
  assert all(r.wait(10) and r.finish_reason == 'error' for r in requests)
  health = engine.health()
  assert not health['ok'] and 'failures in a row' in health['error'] and 'the device is gone' in health['error']
  assert 'failures in a row' in str(fatal[0])
  with pytest.raises(engine_lib.EngineClosed, match='failed'):
    engine.submit([1, 2], 2)
  engine.shutdown()
  assert not engine.health()['thread_alive']


def test_health_reports_a_stalled_device_call(setup, monkeypatch):
  engine, _ = setup
  decode = engine._decode
  entered, release = threading.Event(), threading.Event()

  def hung_decode(*args, **kwargs):
    entered.set()
    release.wait(30)
    return decode(*args, **kwargs)

  monkeypatch.setattr(engine, '_decode', hung_decode)
  request = engine.submit(prompt_of(4), 3)
  assert entered.wait(30)
  time.sleep(0.05)
  stalled = engine.health(stall_timeout=0.01)
  assert not stalled['ok'] and 'stall' in stalled['error'] and stalled['busy_s'] >= 0.01
  assert engine.health(stall_timeout=60)['ok']
  release.set()
  assert request.wait(30) and request.finish_reason == 'length'
  # The request finishes inside the step, a moment before the engine marks the device call over.
  deadline = time.monotonic() + 30
  while engine.health()['busy_s'] is not None and time.monotonic() < deadline:
    time.sleep(0.01)
  assert healthy(engine) and engine.health()['busy_s'] is None
