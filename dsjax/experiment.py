"""A training run with everything its config asks for: the loop (dsjax/train/loop.py) plus the end-of-run hooks of
the layers above training, samples (dsjax/sample/text.py) and eval tasks (dsjax/eval). What train.py runs.

  summary = experiment.train(cfg)
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections

from dsjax import eval as eval_lib
from dsjax.sample import text
from dsjax.train import loop


def train(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """`loop.train` with the samples and eval-task hooks; a bad `eval` section fails before training. Returns the
  loop's summary (with `samples` and `eval_tasks`)."""
  eval_lib.check_config(cfg)
  return loop.train(cfg, hooks=[text.Samples(), eval_lib.EvalTasks()])


def where_to_look(cfg: ml_collections.ConfigDict, summary: dict[str, Any]) -> str:
  """The lines a finished run ends with: where its checkpoint, metrics and TensorBoard logs are, and the commands
  that sample from and serve it."""
  if not cfg.train.workdir:
    return 'nothing was saved (config.train.workdir is empty)'
  workdir = os.path.abspath(cfg.train.workdir)
  lines = [f'run directory: {workdir}']
  if summary.get('checkpoint'):
    lines.append(f'  model checkpoint:  {summary["checkpoint"]}')
  if summary.get('adapter'):
    lines.append(f'  LoRA adapter:      {summary["adapter"]} (PEFT format)')
  lines.append(f'  metrics:           {os.path.join(workdir, "metrics.jsonl")}')
  if cfg.train.tensorboard:
    lines.append(f'  TensorBoard:       tensorboard --logdir {os.path.join(workdir, "tensorboard")}')
  lines.append(f'  resumable state:   {os.path.join(workdir, "checkpoints")}')
  if summary.get('checkpoint'):
    ckpt = os.path.relpath(summary['checkpoint'])
    ckpt = summary['checkpoint'] if ckpt.startswith('..') else ckpt  # outside this folder: the absolute path
    lines += ['next:', f"  python sample.py --checkpoint={ckpt} --prompt='def fibonacci(n):'",
              f'  python serve.py --checkpoint={ckpt}']
  return '\n'.join(lines)
