"""Training metrics that are not the loss itself: bits per byte, the unigram baseline, a JSONL log."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping

import numpy as np

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
