"""The paged engine keeps engine.Engine's failure contract: an error while prefilling one request's chunk fails that
request alone; an error that consumed the device state (donated page pools) rebuilds it, failing the running
requests while queued ones are served; every block is free again afterwards. Failures are
injected by wrapping the jitted feed function (the real one runs); survivors are compared with their prompts
decoded alone."""
import threading

from dsjax.sample.paged_engine import PagedEngine
from tests.sample.test_engine import MAX_LEN, VOCAB_LIMIT, prompt_of, shared_model
from tests.sample.test_paged_engine import check_all_free


def engine_with_failing_feed(fail_when, consume_state, max_running=4):
  """A paged engine whose feed raises RuntimeError at the first call `fail_when(tokens)` accepts: before running
  (state intact) or after the real call consumed the donated pools (`consume_state`)."""
  model, params, _ = shared_model()
  engine = PagedEngine(model, params, num_blocks=30, block_size=4, max_len=MAX_LEN, max_running=max_running,
                       prefill_budget=8, vocab_limit=VOCAB_LIMIT)
  feed, failed = engine._feed, threading.Event()  # pylint: disable=protected-access

  def failing_feed(params, pools, tokens, *args, **kwargs):
    if not failed.is_set() and fail_when(tokens):
      failed.set()
      if consume_state:
        feed(params, pools, tokens, *args, **kwargs)
      raise RuntimeError('injected device failure')
    return feed(params, pools, tokens, *args, **kwargs)

  engine._feed = failing_feed  # pylint: disable=protected-access
  return engine, failed


def test_a_failing_prefill_chunk_fails_its_request_alone():
  _, _, reference = shared_model()
  long_prompt = prompt_of(20, 3)
  engine, failed = engine_with_failing_feed(lambda tokens: tokens.shape[1] > 1, consume_state=False)
  try:
    doomed = engine.submit(long_prompt, 6)
    doomed.wait(120)
    assert failed.is_set() and doomed.finish_reason == 'error'
    assert isinstance(doomed.error, RuntimeError)
    others = [engine.submit(prompt_of(n, n), 6) for n in (5, 11)]
    for n, request in zip((5, 11), others):
      assert request.result(120) == reference(prompt_of(n, n), 6)
    assert engine.health()['ok'] and engine.stats()['restarts'] == 0
    check_all_free(engine)
  finally:
    engine.shutdown(cancel=True)


def test_consumed_device_state_is_rebuilt_and_queued_requests_are_served():
  _, _, reference = shared_model()
  calls = []

  def third_decode(tokens):  # the third decode step (one token per row)
    calls.append(tokens.shape[1] == 1)
    return sum(calls) == 3 and calls[-1]

  engine, failed = engine_with_failing_feed(third_decode, consume_state=True, max_running=1)
  try:
    running = engine.submit(prompt_of(6, 1), 20)
    queued = engine.submit(prompt_of(9, 2), 8)  # waits for the one row
    running.wait(120)
    assert failed.is_set() and running.finish_reason == 'error'
    assert isinstance(running.error, RuntimeError) and 'injected' in str(running.error)
    assert running.tokens == reference(prompt_of(6, 1), 20)[:len(running.tokens)]
    assert queued.result(120) == reference(prompt_of(9, 2), 8)
    stats = engine.stats()
    assert stats['restarts'] == 1 and stats['failed_requests'] == 1 and engine.health()['ok']
    check_all_free(engine)
  finally:
    engine.shutdown(cancel=True)
