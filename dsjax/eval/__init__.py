"""Evaluation harness: held-out loss / bits per byte (`perplexity`), code completion exact match on held-out
functions (`completion`), multiple-choice accuracy by log-likelihood on MMLU-format JSONL (`multiple_choice`).

`run_tasks` runs any of them on a model in memory (the `EvalTasks` hook, at the end of training when `eval.tasks`
is set); `python -m dsjax.eval --checkpoint=DIR --tasks=perplexity,completion,mc --mc_file=FILE` runs them on a
saved checkpoint.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import ml_collections

from dsjax import config as config_lib
from dsjax import lora
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.eval import completion
from dsjax.eval import multiple_choice
from dsjax.eval import perplexity
from dsjax.model import Transformer
from dsjax.train import hooks as hooks_lib
from dsjax.train import metrics as metrics_lib

TASKS = ('perplexity', 'completion', 'mc')


def parse_tasks(tasks: str | Sequence[str]) -> tuple[str, ...]:
  """'perplexity,mc' or a sequence -> validated task names (ValueError naming an unknown one)."""
  names = tuple(t.strip() for t in (tasks.split(',') if isinstance(tasks, str) else tasks) if t.strip())
  for name in names:
    if name not in TASKS:
      raise ValueError(f'unknown eval task {name!r} (tasks: {", ".join(TASKS)})')
  return names


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming `config.eval.*` when the `eval` section cannot run (checked before training)."""
  if 'eval' not in cfg:
    return
  try:
    names = parse_tasks(cfg.eval.tasks)
  except ValueError as e:
    raise config_lib.ConfigError(f'config.eval.tasks={tuple(cfg.eval.tasks)!r}: {e}') from e
  if 'mc' in names and not cfg.eval.mc_file:
    raise config_lib.ConfigError("config.eval.mc_file='': the 'mc' task needs an MMLU-format JSONL file")
  if 'mc' in names and not os.path.isfile(cfg.eval.mc_file):
    raise config_lib.ConfigError(f'config.eval.mc_file={cfg.eval.mc_file!r}: no such file')


def run_tasks(cfg: ml_collections.ConfigDict, params: Any, tasks: str | Sequence[str], *, model=None,
              tokenizer=None, mc_file: str = '', completion_examples: int = 200, completion_lines: int = 1,
              max_new_tokens: int = 64) -> dict[str, dict[str, Any]]:
  """{task: result} for each of `tasks` on `params` of a model of `cfg.model` (data from `cfg.data`)."""
  names = parse_tasks(tasks)
  if 'mc' in names and not mc_file:
    raise ValueError("the 'mc' task needs a multiple-choice JSONL file (--mc_file / eval.mc_file)")
  tokenizer = tokenizer or tokenizer_lib.from_config(cfg.data)
  model = model or Transformer(cfg.model)
  results: dict[str, dict[str, Any]] = {}
  for name in names:
    if name == 'perplexity':
      results[name] = perplexity.evaluate(cfg, params, model=model, tokenizer=tokenizer)
    elif name == 'completion':
      results[name] = completion.evaluate_held_out(cfg, params, model=model, tokenizer=tokenizer,
                                                   max_examples=completion_examples, target_lines=completion_lines,
                                                   max_new_tokens=max_new_tokens)
    else:
      results[name] = multiple_choice.evaluate_file(model, params, tokenizer, mc_file,
                                                    max_len=min(int(cfg.model.max_positions), 4096))
  return results


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """A small text table: one line per (task, metric) with a scalar value."""
  lines = [f'{"task":<12} {"metric":<16} value']
  for task, metrics in results.items():
    for key, value in metrics.items():
      if isinstance(value, float):
        lines.append(f'{task:<12} {key:<16} {value:.4f}')
      elif isinstance(value, (int, str)) and not isinstance(value, bool):
        lines.append(f'{task:<12} {key:<16} {value}')
  return '\n'.join(lines)


class EvalTasks(hooks_lib.Hook):
  """At the end of training, the `eval.tasks` of the config on the final params (single-process runs): printed as a
  table, written to metrics.jsonl as split `eval_tasks`, kept as `summary['eval_tasks']`."""

  def on_end(self, run: hooks_lib.Run) -> None:
    cfg = run.cfg
    if 'eval' not in cfg or not cfg.eval.tasks or jax.process_count() != 1:
      return
    model, params = lora.plain_model(run.model, run.state.params)
    with run.placement.activate():  # the tasks' jitted calls trace on the run's mesh (the kernels run per shard)
      results = run_tasks(cfg, params, cfg.eval.tasks, model=model, tokenizer=run.tokenizer,
                          mc_file=cfg.eval.mc_file, completion_examples=cfg.eval.completion_examples,
                          completion_lines=cfg.eval.completion_lines)
    metrics_lib.JsonlWriter(run.cfg.train.workdir if run.main_process else '').write({
        'split': 'eval_tasks', 'step': int(run.state.step),
        **{task: {k: v for k, v in r.items() if k != 'predictions'} for task, r in results.items()}})
    run.summary['eval_tasks'] = results
    run.say(format_table(results))
