"""Training metrics: bits per byte, the unigram baseline, held-out evaluation, per-step logging (loss, tokens/s,
MFU, divergence), a JSONL / TensorBoard log."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import ml_collections
import numpy as np

from dsjax.train import flops as flops_lib

LN2 = math.log(2.0)


def bits_per_byte(nll_nats: float, num_bytes: float) -> float:
  """Total negative log-likelihood in nats over the bytes it covers -> bits per UTF-8 byte."""
  return nll_nats / LN2 / max(num_bytes, 1.0)


class UnigramBaseline:
  """Token frequencies of the training targets seen so far: the best model that ignores all context.

  Its cross-entropy on held-out data is the bar a language model must clear to have learned anything about
  context. Add-one smoothing keeps unseen tokens finite.
  """

  def __init__(self, vocab_size: int):
    self.counts = np.zeros((vocab_size,), np.int64)

  def update(self, targets: np.ndarray, segment_ids: np.ndarray) -> None:
    """Counts the non-padding targets of a batch ([B, T] arrays)."""
    self.counts += np.bincount(targets[segment_ids > 0].ravel(), minlength=self.counts.size)[:self.counts.size]

  def evaluate(self, batches: Iterable[Mapping[str, np.ndarray]], token_bytes: np.ndarray) -> dict[str, float]:
    """Cross-entropy of the smoothed unigram model on `batches`: nats per token and bits per byte."""
    log_p = np.log((self.counts + 1.0) / (self.counts.sum() + self.counts.size))
    nll = tokens = num_bytes = 0.0
    for batch in batches:
      targets = batch['targets'][batch['segment_ids'] > 0]
      nll -= log_p[targets].sum()
      tokens += targets.size
      num_bytes += token_bytes[targets].sum()
    return {'loss': nll / max(tokens, 1.0), 'bits_per_byte': bits_per_byte(nll, num_bytes)}


class JsonlWriter:
  """Appends one JSON object per line to `<workdir>/metrics.jsonl`; a no-op when workdir is empty."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl') if workdir else None
    if self.path:
      os.makedirs(workdir, exist_ok=True)

  def write(self, record: Mapping[str, Any]) -> None:
    if self.path:
      with open(self.path, 'a') as f:
        f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + '\n')


class MetricsLogger:
  """Process 0's metrics sinks: `<workdir>/metrics.jsonl` (one JSON object per record, appended across resumes) and,
  with `tensorboard`, TensorBoard event files in `<workdir>/tensorboard` (tensorboardX: no TensorFlow needed).
  Other processes and an empty workdir write nothing."""

  def __init__(self, workdir: str, *, tensorboard: bool, enabled: bool = True):
    self._jsonl = JsonlWriter(workdir if enabled else '')
    self._tb = None
    if enabled and workdir and tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top  (optional: event files only when asked)
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, split: str, record: Mapping[str, Any]) -> None:
    """Logs `record` (which has a 'step') under `split` ('train' or 'validation')."""
    self._jsonl.write({'split': split, **record})
    if self._tb is not None:
      for key, value in record.items():
        if key != 'step' and isinstance(_plain(value), (int, float)):
          self._tb.add_scalar(f'{split}/{key}', _plain(value), int(record['step']))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _plain(value: Any) -> Any:
  return value.item() if hasattr(value, 'item') else value


def evaluate(eval_step: Callable[[Any, Any], dict[str, Any]], params: Any, batches: list[Any]) -> dict[str, float]:
  """Held-out loss (nats per token) and bits per byte over fixed eval batches (eval_step: objective.make_eval_step)."""
  sums = [eval_step(params, batch) for batch in batches]
  nll, tokens, num_bytes = (float(sum(s[k] for s in sums)) for k in ('nll_sum', 'tokens', 'bytes'))
  return {'loss': nll / max(tokens, 1.0), 'bits_per_byte': bits_per_byte(nll, num_bytes)}


class TrainingDiverged(RuntimeError):
  """The loss (or gradient) stayed non-finite for more than `train.max_nonfinite_steps` consecutive steps."""


class StepLogger:
  """Reads each step's metrics (waiting for that step only), stops a diverged run, and every `train.log_every`
  steps logs them with the learning rate, tokens/s and MFU since the last log (FLOPs per token from
  dsjax.train.flops; MFU only where the device's peak is known) to `history`, the logger and the progress bar."""

  def __init__(self, cfg: ml_collections.ConfigDict, learning_rate: Callable[[int], Any], logger: MetricsLogger,
               bar: Any, say: Callable[[str], None]):
    self.cfg, self.learning_rate, self.logger, self.bar, self.say = cfg, learning_rate, logger, bar, say
    self.flops_per_token = flops_lib.training_flops_per_token(cfg.model, cfg.data.seq_len)
    self.peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind, cfg.train.peak_flops_per_device)
    self.history: list[dict[str, Any]] = []
    self.time, self.logged_tokens = time.time(), 0

  def finish(self, step: int, device_metrics: Mapping[str, Any], tokens_through_step: int,
             extra: Mapping[str, float] = ()) -> None:
    """`device_metrics` of `step`, the run having fed `tokens_through_step` tokens up to it; `extra`: more fields
    for the record (e.g. realised mixture shares)."""
    cfg = self.cfg
    streak = int(device_metrics['nonfinite_streak'])
    if streak:
      self.say(f'step {step}: non-finite loss or gradient, update skipped ({streak} in a row)')
      if streak > cfg.train.max_nonfinite_steps:
        raise TrainingDiverged(f'training diverged: {streak} consecutive steps up to step {step} had a non-finite '
                               f'loss or gradient (train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); '
                               'lower optim.learning_rate or check the data')
    if step % cfg.train.log_every and step != cfg.train.steps:
      return
    now = time.time()
    tokens_per_sec = (tokens_through_step - self.logged_tokens) / max(now - self.time, 1e-9)
    self.time, self.logged_tokens = now, tokens_through_step
    record = {'step': step, **{k: float(v) for k, v in jax.device_get(dict(device_metrics)).items()},
              'learning_rate': float(self.learning_rate(step - 1)), 'tokens_per_sec': tokens_per_sec, **dict(extra)}
    mfu = flops_lib.mfu(tokens_per_sec, self.flops_per_token, jax.device_count(), self.peak)
    if mfu is not None:
      record['mfu'] = mfu
    self.history.append(record)
    self.logger.write('train', record)
    postfix = dict(loss=f'{record["loss"]:.3f}', tok_s=f'{tokens_per_sec:,.0f}')
    if mfu is not None:
      postfix['mfu'] = f'{mfu:.1%}'
    self.bar.set_postfix(**postfix)
