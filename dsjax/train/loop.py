"""The training loop: data, sharded state, the jitted step, and the hooks that do everything else.

The same loop runs on one CPU and on a multi-host pod: the state lives on a ('data', 'fsdp', 'tensor') mesh with
shardings from the logical-axis rules, each process feeds its own rows of every global batch, and only process 0
logs. See docs/multihost.md. Periodic eval, checkpoints, preemption, the final eval and export are hooks
(dsjax/train/hooks.py) built from the config; callers add more (`dsjax.experiment.train`: samples, eval tasks).
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from dsjax import config as config_lib
from dsjax import distill
from dsjax import sharding as sharding_lib
from dsjax.data import mixture
from dsjax.data import pipeline
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.train import hooks as hooks_lib
from dsjax.train import metrics as metrics_lib
from dsjax.train import objective as objective_lib
from dsjax.train import optimizer as optimizer_lib
from dsjax.train import partition
from dsjax.train import start as start_lib
from dsjax.train import state as state_lib
from dsjax.train import step as step_lib
from dsjax.train import train_checkpoint

TrainingDiverged = metrics_lib.TrainingDiverged


def train(cfg: ml_collections.ConfigDict, hooks: Sequence[hooks_lib.Hook] = ()) -> dict[str, Any]:
  """Trains `cfg.model` on `cfg.data` for `cfg.train.steps` steps (resuming from `<workdir>/checkpoints` when a
  checkpoint is there and `train.resume`); `hooks` run after the run's own (`hooks.for_run`). Returns the summary:
  `params`, `num_params`, `start_step`, `history` (logged train metrics), `evals`, `final_eval`, `unigram` (baseline
  on the same eval batches), `checkpoint`, `adapter` (LoRA), `privacy` (DP-SGD), `preempted`, timings, and what
  `hooks` add. The steps trace under the run's mesh and logical-axis rules, so the attention kernels run per shard.
  """
  start_time = time.time()
  main_process = jax.process_index() == 0
  pipeline.validate_config(cfg.data)
  tokenizer = tokenizer_lib.from_config(cfg.data)
  try:
    token_bytes = tokenizer_lib.token_bytes_table(tokenizer, cfg.model.vocab_size)
  except ValueError as e:
    raise config_lib.ConfigError(f'config.model.vocab_size={cfg.model.vocab_size}: {e}') from e

  mesh = sharding_lib.make_mesh(cfg.mesh)
  placement = sharding_lib.Placement.of(mesh, cfg.mesh)
  num_shards = int(cfg.data.num_shards) or jax.process_count()
  start_lib.check(cfg, mesh, num_shards)
  train_iter, eval_batches = pipeline.for_training(cfg, tokenizer, num_shards)
  data_summary = mixture.prepare(cfg.data)[1]
  shares = mixture.RealisedShares([c.name for c in train_iter.components])

  batch_sharding = sharding_lib.batch_sharding(mesh, cfg.mesh)
  replicated = sharding_lib.replicated(mesh)
  model = start_lib.model_for_run(cfg)
  abstract = start_lib.abstract_params(cfg, model)
  mask = partition.trainable_mask(abstract, partition.spec_for_run(cfg))
  optimizer = optimizer_lib.make_optimizer(cfg.optim, cfg.train.steps,
                                           bias_update_rate=cfg.model.moe.bias_update_rate)
  learning_rate = optimizer_lib.learning_rate_schedule(cfg.optim, cfg.train.steps)
  init_rng, dropout_rng, _ = jax.random.split(jax.random.key(cfg.seed), 3)  # the third: end-of-run samples
  shardings = state_lib.state_shardings(model, optimizer, cfg.data.seq_len, mesh, cfg.mesh, params=abstract,
                                        mask=mask)
  checkpointer = (train_checkpoint.TrainCheckpointer(os.path.join(cfg.train.workdir, 'checkpoints'), cfg.train)
                  if cfg.train.workdir else None)
  unigram = metrics_lib.UnigramBaseline(cfg.model.vocab_size)

  resume_step = checkpointer.latest_step() if checkpointer and cfg.train.resume else None
  if resume_step is not None:
    example = state_lib.abstract_state(abstract, optimizer, mask)
    try:
      state, meta = checkpointer.restore(resume_step, train_checkpoint.abstract_state(shardings, example),
                                         train_iter)
    except ValueError as e:
      raise config_lib.ConfigError(f'config.train.resume: {e}') from e
    unigram.counts = np.asarray(meta['unigram_counts'], np.int64)
  else:
    params = start_lib.initial_params(cfg, model, init_rng, mesh, shardings.params)
    state = state_lib.train_state_from_params(params, optimizer, shardings, mask)
  start_step = int(state.step)
  num_params = state_lib.param_count(state.params)
  # Distillation: the frozen teacher's params enter the step as an argument, with their own shardings.
  teacher = distill.load_teacher(cfg, mesh) if cfg.distill.teacher else None
  teacher_args = (teacher[1],) if teacher else ()
  train_step = sharding_lib.placed(jax.jit(
      step_lib.make_train_step(model, optimizer, cfg, teacher=teacher, mask=mask), donate_argnums=0,
      in_shardings=(shardings, batch_sharding, replicated) + tuple(distill.param_shardings(p) for p in teacher_args),
      out_shardings=(shardings, replicated)), placement)
  eval_step = sharding_lib.placed(jax.jit(objective_lib.make_eval_step(model, jnp.asarray(token_bytes)),
                                          in_shardings=(shardings.params, batch_sharding), out_shardings=replicated),
                                  placement)
  eval_arrays = [sharding_lib.global_batch(sharding_lib.local_rows(b), batch_sharding) for b in eval_batches]
  logger = metrics_lib.MetricsLogger(cfg.train.workdir, tensorboard=cfg.train.tensorboard, enabled=main_process)
  bar = tqdm.tqdm(total=cfg.train.steps, initial=start_step, disable=not (cfg.train.progress_bar and main_process),
                  desc='train', unit='step', dynamic_ncols=True)
  say = lambda text: _say(bar, main_process, text)
  step_logger = metrics_lib.StepLogger(cfg, learning_rate, logger, bar, say)
  run = hooks_lib.Run(cfg=cfg, model=model, tokenizer=tokenizer, placement=placement, logger=logger, say=say,
                      evaluate=lambda params: metrics_lib.evaluate(eval_step, params, eval_arrays), state=state)
  run.summary.update(num_params=num_params, start_step=start_step, history=step_logger.history, evals=[],
                     final_eval=None, unigram=None, samples=[], checkpoint=None, adapter=None, privacy=None,
                     eval_tasks=None, preempted=False)
  say(start_lib.describe(cfg, mesh, state.params, mask, resume_step, step_logger.peak is not None))
  say(mixture.format_report(train_iter.components, data_summary, cfg.data.mixture_unit))
  logger.write('data', {'step': start_step, **data_summary,
                        'weights': {c.name: c.weight for c in train_iter.components}})
  if len(train_iter.stages) > 1:
    say('curriculum: ' + '; '.join(f'from step {s.start + 1}: seq_len {s.seq_len}, fim_rate {s.fim_rate:g}'
                                   for s in train_iter.stages))

  def meta() -> dict[str, Any]:
    return {'unigram_counts': unigram.counts.tolist(), 'config': train_checkpoint.config_json(cfg)}

  run_hooks = hooks_lib.for_run(cfg, model, checkpointer, train_iter, meta, unigram, eval_batches, token_bytes)
  run_hooks += list(hooks)

  def finish(step: int, device_metrics: Any, tokens: int) -> None:
    shares_now = {f'share/{n}': v for n, v in shares.shares().items()} if len(shares.names) > 1 else {}
    step_logger.finish(step, device_metrics, tokens, shares_now)

  # A step's metrics are read after the next step is dispatched, so the host never stalls the device.
  pending, tokens = None, 0
  try:
    for step in range(start_step + 1, cfg.train.steps + 1):
      local = next(train_iter)
      shares.update(local.pop('source_ids'), local['segment_ids'])
      tokens += cfg.train.batch_size * local['inputs'].shape[1]
      unigram.update(local['targets'], local['segment_ids'])
      state, step_metrics = train_step(state, sharding_lib.global_batch(local, batch_sharding), dropout_rng,
                                       *teacher_args)
      if pending is not None:
        finish(*pending)
      pending = (step, step_metrics, tokens)
      bar.update(1)
      run.state = state
      for hook in run_hooks:
        hook.on_step(run, step)
      if run.stop:
        break
    if pending is not None:
      finish(*pending)
  finally:
    for hook in run_hooks:  # SIGTERM is the default again once no step runs
      if isinstance(hook, hooks_lib.Preemption):
        hook.close()
    bar.close()
  run.summary['train_seconds'] = time.time() - start_time
  run.say = lambda text: _say(None, main_process, text)
  try:
    if not run.stop:
      for hook in run_hooks:
        hook.on_end(run)
  finally:
    for hook in run_hooks:
      if hasattr(hook, 'close') and not isinstance(hook, hooks_lib.Preemption):
        hook.close()
    logger.close()
  run.summary.pop('last_eval', None)
  return {**run.summary, 'params': state.params, 'total_seconds': time.time() - start_time}


def _say(bar, main_process: bool, text: str) -> None:
  """A line on process 0's console (through the progress bar when there is one, so the bar stays intact)."""
  if not main_process:
    return
  if bar is not None:
    bar.write(text)
  else:
    print(text)
