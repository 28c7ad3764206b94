"""Preemption: a SIGTERM stops training at a step boundary, after a checkpoint, instead of killing it mid-step."""
from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """Answers "stop after this step?".

  One process: a SIGTERM handler sets a flag (the previous handler is restored by `close`). Several processes:
  JAX's distributed preemption service (on by default after `jax.distributed.initialize`) catches SIGTERM on any
  host and agrees on a step; `multihost_utils.reached_preemption_sync_point` is then True on every process at that
  same step, so all of them save the same checkpoint. Call `should_stop` once per step, on every process.
  """

  def __init__(self):
    self._multi_process = jax.process_count() > 1
    self._signalled = False
    self._previous = None
    if not self._multi_process and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._signalled = True

  def should_stop(self, step: int) -> bool:
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
