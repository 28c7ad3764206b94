"""Loop hooks: what happens every N steps or at the end of a run, outside the loop itself.

The loop (dsjax/train/loop.py) runs steps; after each it calls `hook.on_step(run, step)` of every hook in order, and
after the last step (unless preempted) `hook.on_end(run)`. A hook reads the run (`Run`: config, model, current
state, mesh, logger) and writes what it produced into `run.summary`. The loop's own hooks live here (periodic eval,
preemption, checkpoints, final eval and model export; `for_run` lists them); features bring theirs: the LoRA
export (dsjax/lora.py), the privacy report (dsjax/privacy.py), samples (dsjax/sample/text.py), eval tasks
(dsjax/eval/__init__.py). A hook is any object with `on_step` and `on_end` (and optionally `close`);
`dsjax.experiment.train` runs the loop with all that the config asks for.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from dsjax import checkpoint
from dsjax import lora as lora_lib
from dsjax import privacy
from dsjax.train import metrics as metrics_lib
from dsjax.train import preemption
from dsjax.train import state as state_lib
from dsjax.train import train_checkpoint


@dataclasses.dataclass
class Run:
  """What hooks see of a run in progress. `state` is the latest state (its step may still be computing); `say`
  prints on process 0 (through the progress bar); `stop` ends the loop after this step (preemption)."""
  cfg: ml_collections.ConfigDict
  model: Any
  tokenizer: Any
  placement: Any
  logger: metrics_lib.MetricsLogger
  say: Callable[[str], None]
  evaluate: Callable[[Any], dict[str, float]]  # params -> held-out loss and bits per byte on the fixed eval batches
  state: state_lib.TrainState | None = None
  stop: bool = False
  summary: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def main_process(self) -> bool:
    return jax.process_index() == 0

  @property
  def workdir(self) -> str:
    return os.path.abspath(self.cfg.train.workdir) if self.cfg.train.workdir else ''


class Hook:
  """A no-op hook; subclasses override what they need."""

  def on_step(self, run: Run, step: int) -> None:
    del run, step

  def on_end(self, run: Run) -> None:
    del run


class PeriodicEval(Hook):
  """Held-out loss every `train.eval_every` steps (not at the last: the final eval does that); logged as
  `validation`, kept in `summary['evals']` and as `last_eval` for the checkpoint saved at the same step."""

  def __init__(self, every: int):
    self.every = every

  def on_step(self, run: Run, step: int) -> None:
    run.summary['last_eval'] = None
    if not self.every or step % self.every or step == run.cfg.train.steps:
      return
    result = {'step': step, **run.evaluate(run.state.params)}
    run.summary.setdefault('evals', []).append(result)
    run.summary['last_eval'] = result
    run.logger.write('validation', result)
    run.say(f'step {step}: held-out loss {result["loss"]:.4f}, {result["bits_per_byte"]:.3f} bits/byte')


class Preemption(Hook):
  """SIGTERM (a preempted VM, `scancel`) stops the run after the current step (dsjax/train/preemption.py)."""

  def __init__(self):
    self.watcher = preemption.PreemptionWatcher()

  def on_step(self, run: Run, step: int) -> None:
    if self.watcher.should_stop(step):
      run.stop = True
      run.summary['preempted'] = True
      run.say(f'preempted (SIGTERM): stopping after step {step}')

  def close(self) -> None:
    self.watcher.close()


class Checkpointing(Hook):
  """Saves the full train state (with the data iterator's position) to <workdir>/checkpoints every
  `train.checkpoint_every` steps, when the run is preempted and at the end (dsjax/train/train_checkpoint.py)."""

  def __init__(self, checkpointer: train_checkpoint.TrainCheckpointer, every: int, data_iter: Any,
               meta: Callable[[], dict[str, Any]]):
    self.checkpointer, self.every, self.data_iter, self.meta = checkpointer, every, data_iter, meta

  def on_step(self, run: Run, step: int) -> None:
    periodic = self.every and step % self.every == 0
    if (run.stop or periodic) and step != run.cfg.train.steps:
      last = run.summary.get('last_eval')
      self.checkpointer.save(step, run.state, self.data_iter, self.meta(), eval_loss=last and last['loss'])
      if run.stop:
        run.say(f'checkpoint saved in {self.checkpointer.directory}')

  def on_end(self, run: Run) -> None:
    if run.summary['start_step'] < run.cfg.train.steps:  # a re-run of a finished run has nothing new to save
      final = run.summary.get('final_eval')
      self.checkpointer.save(run.cfg.train.steps, run.state, self.data_iter, self.meta(),
                             eval_loss=final and final['loss'])

  def close(self) -> None:
    self.checkpointer.wait()
    self.checkpointer.close()


class FinalEval(Hook):
  """The held-out loss after the last step against the unigram baseline of the same batches."""

  def __init__(self, unigram: metrics_lib.UnigramBaseline, eval_batches: list[dict[str, np.ndarray]],
               token_bytes: np.ndarray):
    self.unigram, self.eval_batches, self.token_bytes = unigram, eval_batches, token_bytes

  def on_end(self, run: Run) -> None:
    final = {'step': run.cfg.train.steps, **run.evaluate(run.state.params)}
    run.summary.setdefault('evals', []).append(final)
    run.summary['final_eval'] = final
    run.summary['unigram'] = baseline = self.unigram.evaluate(self.eval_batches, self.token_bytes)
    run.logger.write('validation', final)
    run.say(f'final held-out loss {final["loss"]:.4f} nats/token = {final["bits_per_byte"]:.3f} bits/byte '
            f'(unigram baseline {baseline["bits_per_byte"]:.3f} bits/byte); {run.summary["num_params"]:,} '
            f'parameters; {run.summary["train_seconds"]:.0f} s')


class ExportModel(Hook):
  """The final params as a model checkpoint (dsjax/checkpoint.py) in <workdir>/checkpoint, the directory sample.py,
  serve.py, eval and convert read, with the tokenizer files; `export_params(run)` may transform them first."""

  def __init__(self, export: Callable[[Run], tuple[ml_collections.ConfigDict, Any]] | None = None):
    self.export = export

  def on_end(self, run: Run) -> None:
    if not run.workdir:
      return
    cfg, params = self.export(run) if self.export else (run.cfg, run.state.params)
    directory = os.path.join(run.workdir, 'checkpoint')
    checkpoint.save_model(directory, cfg, params, tokenizer_files(run.cfg.data.tokenizer))
    run.summary['checkpoint'] = directory
    run.say(f'saved the final model to {directory}')


def tokenizer_files(spec: str) -> list[str]:
  """tokenizer.json and its sibling config files, for a HF tokenizer; nothing for the byte tokenizer."""
  if spec == 'byte':
    return []
  folder = spec if os.path.isdir(spec) else os.path.dirname(spec)
  return [os.path.join(folder, name) for name in checkpoint.TOKENIZER_FILES
          if os.path.isfile(os.path.join(folder, name))]


def for_run(cfg: ml_collections.ConfigDict, model: Any, checkpointer: train_checkpoint.TrainCheckpointer | None,
            data_iter: Any, meta: Callable[[], dict[str, Any]], unigram: metrics_lib.UnigramBaseline,
            eval_batches: list[dict[str, np.ndarray]], token_bytes: np.ndarray) -> list[Any]:
  """A run's own hooks, in order: periodic eval, preemption, checkpoints (with a workdir), the final eval, the export
  (a LoRA run: the PEFT adapter and the merged model) and, with DP-SGD, the privacy report."""
  hooks: list[Any] = [PeriodicEval(cfg.train.eval_every), Preemption()]
  if checkpointer:
    hooks.append(Checkpointing(checkpointer, cfg.train.checkpoint_every, data_iter, meta))
  hooks.append(FinalEval(unigram, eval_batches, token_bytes))
  if isinstance(model, lora_lib.LoraModel):
    lora_export = lora_lib.LoraExport(model.spec)
    hooks += [lora_export, ExportModel(lora_export.merged)]
  else:
    hooks.append(ExportModel())
  if cfg.privacy.enabled:
    hooks.append(privacy.PrivacyReport())
  return hooks
