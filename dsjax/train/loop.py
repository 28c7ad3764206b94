"""The training loop: data, sharded state, jitted steps, checkpoints and resume, eval, logging, end-of-run samples.

The same loop runs on one CPU and on a multi-host pod: the state lives on a ('data', 'fsdp', 'tensor') mesh with
shardings from the logical-axis rules, each process feeds its own rows of every global batch, and only process 0
logs. See docs/multihost.md.
"""
from __future__ import annotations

import itertools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from dsjax import config as config_lib
from dsjax import distill
from dsjax import lora as lora_lib
from dsjax import privacy
from dsjax import sharding as sharding_lib
from dsjax.data import mixture
from dsjax.data import pipeline
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.model import Transformer
from dsjax.sample import sampler
from dsjax import checkpoint
from dsjax.train import flops as flops_lib
from dsjax.train import metrics as metrics_lib
from dsjax.train import optimizer as optimizer_lib
from dsjax.train import preemption
from dsjax.train import state as state_lib
from dsjax.train import step as step_lib
from dsjax.train import train_checkpoint


class TrainingDiverged(RuntimeError):
  """The loss (or gradient) stayed non-finite for more than `train.max_nonfinite_steps` consecutive steps."""


def load_eval_batches(cfg: ml_collections.ConfigDict, tokenizer) -> list[dict[str, np.ndarray]]:
  """The first `data.eval_batches` global batches of the held-out split: the same fixed set at every evaluation
  (every process loads them all and feeds its own rows)."""
  dataset = pipeline.make_dataset(cfg.data, tokenizer, split='validation', batch_size=cfg.train.batch_size,
                                  seed=cfg.data.shuffle_seed, repeat=False)
  batches = [{k: v for k, v in b.items() if k != 'source_ids'}
             for b in itertools.islice(iter(dataset), cfg.data.eval_batches)]
  if not batches:
    raise config_lib.ConfigError('the validation split produced no batch: lower train.batch_size or data.seq_len, '
                     'or raise data.validation_fraction')
  return batches


def evaluate(eval_step, params: Any, batches: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Held-out loss (nats per token) and bits per byte over the fixed eval batches."""
  sums = [eval_step(params, batch) for batch in batches]
  nll, tokens, num_bytes = (float(sum(s[k] for s in sums)) for k in ('nll_sum', 'tokens', 'bytes'))
  return {'loss': nll / max(tokens, 1.0), 'bits_per_byte': metrics_lib.bits_per_byte(nll, num_bytes)}


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's rows of a global batch (process p holds the p-th contiguous block of rows)."""
  per_process = len(batch['inputs']) // jax.process_count()
  rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
  return {k: v[rows] for k, v in batch.items()}


def _check_divisibility(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, num_shards: int) -> None:
  sharding_lib.check_heads_divide(cfg.model, mesh, cfg.mesh)
  batch_devices = mesh.shape['data'] * mesh.shape['fsdp']
  micro = cfg.train.batch_size // cfg.train.grad_accum_steps
  if micro % batch_devices:
    raise config_lib.ConfigError(
        f'config.train.batch_size={cfg.train.batch_size}: each of the {cfg.train.grad_accum_steps} microbatches '
        f'({micro} rows) must split evenly over the data x fsdp = {batch_devices} devices')
  if num_shards % jax.process_count():
    raise config_lib.ConfigError(f'config.data.num_shards={num_shards}: must be a multiple of the '
                                 f'{jax.process_count()} processes')


def train(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Trains `cfg.model` on `cfg.data` for `cfg.train.steps` steps, resuming from `<workdir>/checkpoints` when a
  checkpoint is there (and `train.resume`); returns a summary of the run.

  The summary holds `params`, `num_params`, `start_step`, `history` (logged train metrics of this run), `evals`,
  `final_eval`, `unigram` (baseline on the same eval batches), `samples`, `checkpoint` (the final model directory,
  when `train.workdir` is set), `adapter` (with `lora.enabled`: the PEFT adapter directory), `preempted` (stopped
  by SIGTERM after saving) and timings.

  With `lora.enabled` only low-rank adapters train: the base comes from `train.init_from` (or a random init), the
  adapters from `lora.adapter` (or fresh), and the run ends with the adapter in PEFT format in <workdir>/adapter and
  the merged model in <workdir>/checkpoint.

  The train and eval steps trace under the run's mesh and logical-axis rules (`sharding.Placement`), so the attention
  kernels run per shard.
  """
  start_time = time.time()
  main_process = jax.process_index() == 0
  if 'eval' in cfg and cfg.eval.tasks:  # end-of-run eval tasks: a bad task name fails now, not after training
    from dsjax import eval as eval_lib  # pylint: disable=g-import-not-at-top
    eval_lib.check_config(cfg)
  tokenizer = tokenizer_lib.from_config(cfg.data)
  if cfg.model.vocab_size < tokenizer.vocab_size:
    raise config_lib.ConfigError(f'config.model.vocab_size={cfg.model.vocab_size}: smaller than the '
                                 f"tokenizer's {tokenizer.vocab_size} ids")
  token_bytes = np.zeros((cfg.model.vocab_size,), np.int32)
  token_bytes[:tokenizer.vocab_size] = tokenizer.token_byte_lengths()

  mesh = sharding_lib.make_mesh(cfg.mesh)
  placement = sharding_lib.Placement.of(mesh, cfg.mesh)
  num_shards = int(cfg.data.num_shards) or jax.process_count()
  _check_divisibility(cfg, mesh, num_shards)
  try:
    train_iter = pipeline.ShardedBatchIterator(
        cfg.data, tokenizer, split='train', global_batch_size=cfg.train.batch_size, seed=cfg.data.shuffle_seed,
        num_shards=num_shards, process_index=jax.process_index(), process_count=jax.process_count())
    eval_batches = load_eval_batches(cfg, tokenizer)
  except ValueError as e:  # an empty source or split: name the config field that points at it
    where = f'config.data.mixture ({", ".join(cfg.data.mixture)})' if cfg.data.get('mixture') else (
        f'config.data.source={cfg.data.source!r}')
    raise config_lib.ConfigError(f'{where}: {e}') from e
  data_summary = mixture.prepare(cfg.data)[1]
  shares = mixture.RealisedShares([c.name for c in train_iter.components])

  batch_sharding = sharding_lib.batch_sharding(mesh, cfg.mesh)
  replicated = sharding_lib.replicated(mesh)
  lora = lora_lib.spec_for_run(cfg)
  model = Transformer(cfg.model, lora=lora)
  optimizer = optimizer_lib.make_optimizer(cfg.optim, cfg.train.steps,
                                           trainable=lora_lib.trainable_mask if lora else None)
  learning_rate = optimizer_lib.learning_rate_schedule(cfg.optim, cfg.train.steps)
  init_rng, dropout_rng, sample_rng = jax.random.split(jax.random.key(cfg.seed), 3)
  shardings = state_lib.state_shardings(model, optimizer, cfg.data.seq_len, mesh, cfg.mesh)
  checkpointer = (train_checkpoint.TrainCheckpointer(os.path.join(cfg.train.workdir, 'checkpoints'), cfg.train)
                  if cfg.train.workdir else None)
  unigram = metrics_lib.UnigramBaseline(cfg.model.vocab_size)

  resume_step = checkpointer.latest_step() if checkpointer and cfg.train.resume else None
  if resume_step is not None:
    example = jax.eval_shape(lambda: state_lib.init_train_state(model, optimizer, init_rng, cfg.data.seq_len))
    try:
      state, meta = checkpointer.restore(resume_step, train_checkpoint.abstract_state(shardings, example),
                                         train_iter)
    except ValueError as e:
      raise config_lib.ConfigError(f'config.train.resume: {e}') from e
    unigram.counts = np.asarray(meta['unigram_counts'], np.int64)
  elif lora:
    state = _lora_state(cfg, lora, model, optimizer, init_rng, mesh, shardings)
  elif cfg.train.init_from:
    state = state_lib.train_state_from_params(initial_params(cfg, mesh), optimizer, shardings)
  else:
    state = state_lib.init_train_state(model, optimizer, init_rng, cfg.data.seq_len, shardings)
  start_step = int(state.step)
  num_params = state_lib.param_count(state.params)
  # Distillation: the frozen teacher's params enter the step as an argument, with their own shardings.
  teacher = distill.load_teacher(cfg, mesh) if cfg.distill.teacher else None
  teacher_args = (teacher[1],) if teacher else ()
  train_step = sharding_lib.placed(jax.jit(
      step_lib.make_train_step(model, optimizer, cfg, teacher=teacher), donate_argnums=0,
      in_shardings=(shardings, batch_sharding, replicated) + tuple(distill.param_shardings(p) for p in teacher_args),
      out_shardings=(shardings, replicated)), placement)
  eval_step = sharding_lib.placed(jax.jit(step_lib.make_eval_step(model, jnp.asarray(token_bytes)),
                                          in_shardings=(shardings.params, batch_sharding), out_shardings=replicated),
                                  placement)
  eval_arrays = [sharding_lib.global_batch(local_rows(b), batch_sharding) for b in eval_batches]
  logger = metrics_lib.MetricsLogger(cfg.train.workdir, tensorboard=cfg.train.tensorboard, enabled=main_process)
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  throughput = _Throughput(cfg, start_step)

  bar = tqdm.tqdm(total=cfg.train.steps, initial=start_step, disable=not (cfg.train.progress_bar and main_process),
                  desc='train', unit='step', dynamic_ncols=True)
  _say(bar, main_process, f'model: {num_params:,} parameters; attention={cfg.model.attention.kind}, '
       f'positions={cfg.model.positions.kind}; {tokens_per_step:,} tokens per step; mesh {dict(mesh.shape)} over '
       f'{jax.process_count()} process(es)' + (f'; resumed at step {start_step}' if resume_step is not None else ''))
  _say(bar, main_process, mixture.format_report(train_iter.components, data_summary, cfg.data.mixture_unit))
  logger.write('data', {'step': start_step, **{k: v for k, v in data_summary.items()},
                        'weights': {c.name: c.weight for c in train_iter.components}})
  if len(train_iter.stages) > 1:
    _say(bar, main_process, 'curriculum: ' + '; '.join(
        f'from step {s.start + 1}: seq_len {s.seq_len}, fim_rate {s.fim_rate:g}' for s in train_iter.stages))
  if lora:
    num_trainable = state_lib.param_count(lora_lib.adapters_of(state.params))
    _say(bar, main_process, f'lora: {num_trainable:,} trainable adapter parameters (rank {lora.rank}, alpha '
         f'{lora.alpha:g}, targets {",".join(lora.targets)}' + (', int8 base' if lora.base_int8 else '') + ')')

  def meta() -> dict[str, Any]:
    return {'unigram_counts': unigram.counts.tolist(), 'config': train_checkpoint.config_json(cfg)}

  history, evals = [], []
  watcher = preemption.PreemptionWatcher()
  preempted = False
  # A step's metrics are read after the next step is dispatched, so the host never stalls the device.
  pending = None
  try:
    for step in range(start_step + 1, cfg.train.steps + 1):
      local = next(train_iter)
      shares.update(local.pop('source_ids'), local['segment_ids'])
      throughput.tokens += cfg.train.batch_size * local['inputs'].shape[1]
      unigram.update(local['targets'], local['segment_ids'])
      state, step_metrics = train_step(state, sharding_lib.global_batch(local, batch_sharding), dropout_rng,
                                       *teacher_args)
      if pending is not None:
        _finish_step(*pending, cfg, throughput, learning_rate, bar, history, logger, shares)
      pending = (step, step_metrics)
      bar.update(1)
      eval_loss = None
      if step % cfg.train.eval_every == 0 and step != cfg.train.steps:
        result = {'step': step, **evaluate(eval_step, state.params, eval_arrays)}
        evals.append(result)
        eval_loss = result['loss']
        logger.write('validation', result)
        _say(bar, main_process,
             f'step {step}: held-out loss {result["loss"]:.4f}, {result["bits_per_byte"]:.3f} bits/byte')
      stop = watcher.should_stop(step)
      periodic = cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0
      if checkpointer and (stop or periodic) and step != cfg.train.steps:
        checkpointer.save(step, state, train_iter, meta(), eval_loss=eval_loss)
      if stop:
        preempted = True
        _say(bar, main_process, f'preempted (SIGTERM): stopping after step {step}' +
             (f', checkpoint saved in {checkpointer.directory}' if checkpointer else ''))
        break
    if pending is not None:
      _finish_step(*pending, cfg, throughput, learning_rate, bar, history, logger, shares)
  finally:
    watcher.close()
    bar.close()
  train_time = time.time() - start_time

  final, baseline, saved_to, adapter_dir, samples = None, None, None, None, []
  if not preempted:
    final = {'step': cfg.train.steps, **evaluate(eval_step, state.params, eval_arrays)}
    evals.append(final)
    logger.write('validation', final)
    baseline = unigram.evaluate(eval_batches, token_bytes)
    if checkpointer and start_step < cfg.train.steps:  # a re-run of a finished run has nothing new to save
      checkpointer.save(cfg.train.steps, state, train_iter, meta(), eval_loss=final['loss'])
    if cfg.train.workdir:
      saved_to = os.path.join(os.path.abspath(cfg.train.workdir), 'checkpoint')
      if lora:  # the adapter alone in PEFT format; the merged (plain) model for serve.py and export
        adapter_dir = os.path.join(os.path.abspath(cfg.train.workdir), 'adapter')
        lora_lib.save_peft(adapter_dir, state.params, cfg.model, lora)
        merged_cfg = ml_collections.ConfigDict(cfg.to_dict())
        merged_cfg.lora.enabled, merged_cfg.lora.adapter = False, ''
        checkpoint.save_model(saved_to, merged_cfg, lora_lib.merge(state.params, lora),
                              _tokenizer_files(cfg.data.tokenizer))
        _say(None, main_process, f'saved the LoRA adapter (PEFT format) to {adapter_dir}')
      else:
        checkpoint.save_model(saved_to, cfg, state.params, _tokenizer_files(cfg.data.tokenizer))
      _say(None, main_process, f'saved the final model to {saved_to}')
    _say(None, main_process, f'final held-out loss {final["loss"]:.4f} nats/token = {final["bits_per_byte"]:.3f} '
         f'bits/byte (unigram baseline {baseline["bits_per_byte"]:.3f} bits/byte); {num_params:,} parameters; '
         f'{train_time:.0f} s')
  if checkpointer:
    checkpointer.wait()
    checkpointer.close()
  logger.close()

  if final is not None and cfg.train.num_samples and jax.process_count() == 1:
    prompts = [cfg.train.sample_prompts[i % len(cfg.train.sample_prompts)] for i in range(cfg.train.num_samples)]
    samples = complete(model, state.params, tokenizer, prompts, sample_rng, cfg.sample, placement)
    for prompt, text in zip(prompts, samples):
      print(f'--- sample ---\n{prompt}{text}')
  eval_tasks = None  # dsjax.eval tasks of `eval.tasks` (held-out perplexity, completion, multiple choice)
  if final is not None and 'eval' in cfg and cfg.eval.tasks and jax.process_count() == 1:
    from dsjax import eval as eval_lib  # pylint: disable=g-import-not-at-top  (dsjax.eval imports this module)
    with placement.activate():  # the tasks' jitted calls trace on the run's mesh (the kernels run per shard)
      eval_tasks = eval_lib.run_tasks(cfg, state.params, cfg.eval.tasks, model=model, tokenizer=tokenizer,
                                      mc_file=cfg.eval.mc_file, completion_examples=cfg.eval.completion_examples,
                                      completion_lines=cfg.eval.completion_lines)
    metrics_lib.JsonlWriter(cfg.train.workdir if main_process else '').write({'split': 'eval_tasks', 'step': int(
        state.step), **{task: {k: v for k, v in r.items() if k != 'predictions'} for task, r in eval_tasks.items()}})
    _say(None, main_process, eval_lib.format_table(eval_tasks))
  privacy_report = None  # DP-SGD: epsilon of all steps taken (Poisson sampling assumed; see dsjax/privacy.py)
  if cfg.privacy.enabled:
    privacy_report = privacy.report(cfg, int(state.step), privacy.count_train_rows(cfg.data, tokenizer))
    _say(None, main_process, f'DP-SGD: epsilon {privacy_report["epsilon"]:.3f} at delta {cfg.privacy.delta:g} '
         f'after {privacy_report["steps"]} steps (sampling rate {privacy_report["sampling_rate"]:.3g}, noise '
         f'multiplier {cfg.privacy.noise_multiplier:g})')
  return {
      'params': state.params, 'num_params': num_params, 'start_step': start_step, 'history': history,
      'evals': evals, 'final_eval': final, 'unigram': baseline, 'samples': samples, 'train_seconds': train_time,
      'checkpoint': saved_to, 'adapter': adapter_dir, 'preempted': preempted, 'total_seconds': time.time() - start_time,
      'privacy': privacy_report,  # None unless privacy.enabled
      'eval_tasks': eval_tasks,  # None unless eval.tasks
  }


def initial_params(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Any:
  """The params of the checkpoint `train.init_from`, checked against `cfg.model` (any mismatch names the field),
  placed on `mesh` when given (each device reads only its shards)."""
  saved = checkpoint.load_config(cfg.train.init_from).model
  for field in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim',
                'tie_embeddings'):
    if saved[field] != cfg.model[field]:
      raise config_lib.ConfigError(f'config.model.{field}={cfg.model[field]!r}: the checkpoint in '
                                   f'train.init_from={cfg.train.init_from!r} has {saved[field]!r}')
  return checkpoint.load_params(cfg.train.init_from, cfg.model, mesh, cfg.mesh if mesh is not None else None)


def _lora_state(cfg: ml_collections.ConfigDict, lora: lora_lib.LoraSpec, model: Transformer, optimizer,
                rng: jax.Array, mesh: jax.sharding.Mesh, shardings: state_lib.TrainState) -> state_lib.TrainState:
  """The first state of a LoRA run: the base of `train.init_from` (or a random init) with the adapters of
  `lora.adapter` (or fresh ones), projection kernels quantized to int8 with `lora.base_int8`."""
  adapters = None
  if cfg.lora.adapter:
    try:
      _, adapters = lora_lib.load_peft(cfg.lora.adapter, cfg.model)
    except (ValueError, FileNotFoundError) as e:
      raise config_lib.ConfigError(f'config.lora.adapter={cfg.lora.adapter!r}: {e}') from e
  if cfg.train.init_from:
    params = lora_lib.add_adapters(initial_params(cfg, mesh), cfg.model, lora, rng, adapters)
    return state_lib.train_state_from_params(params, optimizer, shardings)
  state = state_lib.init_train_state(model, optimizer, rng, cfg.data.seq_len, shardings)
  if adapters is None:
    return state
  params = jax.tree_util.tree_map(lambda x: x, state.params)  # a copy to edit: adapters replaced, base kept
  for module, targets in adapters['layers'].items():
    for target, values in targets.items():
      params['layers'][module][target].update(values)
  return state_lib.train_state_from_params(params, optimizer, shardings)


def complete(model, params: Any, tokenizer, prompts: list[str], rng: jax.Array,
             sample_cfg: ml_collections.ConfigDict, placement: sharding_lib.Placement | None = None) -> list[str]:
  """Text completions of `prompts` (each starts a new document, so it is prefixed with BOS); `placement`: the mesh
  the params live on."""
  encoded = [[tokenizer.bos_id] + list(tokenizer.encode(p)) for p in prompts]
  new_tokens = sampler.generate(
      model, params, encoded, rng, max_new_tokens=sample_cfg.max_new_tokens, temperature=sample_cfg.temperature,
      top_k=sample_cfg.top_k, top_p=sample_cfg.top_p, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
      vocab_limit=tokenizer.vocab_size, placement=placement)
  return [tokenizer.decode(t) for t in new_tokens]


def _tokenizer_files(spec: str) -> list[str]:
  """tokenizer.json and its sibling config files, for a HF tokenizer; nothing for the byte tokenizer."""
  if spec == 'byte':
    return []
  folder = spec if os.path.isdir(spec) else os.path.dirname(spec)
  return [os.path.join(folder, name) for name in checkpoint.TOKENIZER_FILES
          if os.path.isfile(os.path.join(folder, name))]


class _Throughput:
  """Tokens per second and MFU between consecutive logged steps (FLOPs per token from dsjax.train.flops)."""

  def __init__(self, cfg: ml_collections.ConfigDict, start_step: int):
    self.tokens = 0  # global tokens since the last update (the loop adds each step's; curriculum stages differ)
    self.flops_per_token = flops_lib.training_flops_per_token(cfg.model, cfg.data.seq_len)
    self.peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind, cfg.train.peak_flops_per_device)
    self.time, self.step = time.time(), start_step

  def update(self, step: int) -> dict[str, float]:
    now = time.time()
    tokens_per_sec = self.tokens / max(now - self.time, 1e-9)
    self.time, self.step, self.tokens = now, step, 0
    out = {'tokens_per_sec': tokens_per_sec}
    mfu = flops_lib.mfu(tokens_per_sec, self.flops_per_token, jax.device_count(), self.peak)
    if mfu is not None:
      out['mfu'] = mfu
    return out


def _finish_step(step: int, device_metrics, cfg: ml_collections.ConfigDict, throughput: _Throughput, learning_rate,
                 bar, history: list, logger: metrics_lib.MetricsLogger, shares: mixture.RealisedShares) -> None:
  """Reads one step's metrics (waiting for that step only): stops a diverged run, logs every `train.log_every`
  (with a mixture, the realised token share of each component so far on this process as `share/<name>`)."""
  streak = int(device_metrics['nonfinite_streak'])
  if streak:
    _say(bar, jax.process_index() == 0, f'step {step}: non-finite loss or gradient, update skipped '
         f'({streak} in a row)')
    if streak > cfg.train.max_nonfinite_steps:
      raise TrainingDiverged(f'training diverged: {streak} consecutive steps up to step {step} had a non-finite '
                             f'loss or gradient (train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); lower '
                             'optim.learning_rate or check the data')
  if step % cfg.train.log_every and step != cfg.train.steps:
    return
  record = {'step': step, **{k: float(v) for k, v in jax.device_get(device_metrics).items()},
            'learning_rate': float(learning_rate(step - 1)), **throughput.update(step)}
  if len(shares.names) > 1:
    record.update({f'share/{name}': share for name, share in shares.shares().items()})
  history.append(record)
  logger.write('train', record)
  postfix = dict(loss=f'{record["loss"]:.3f}', tok_s=f'{record["tokens_per_sec"]:,.0f}')
  if 'mfu' in record:
    postfix['mfu'] = f'{record["mfu"]:.1%}'
  bar.set_postfix(**postfix)


def _say(bar, main_process: bool, text: str) -> None:
  """A line on process 0's console (through the progress bar when there is one, so the bar stays intact)."""
  if not main_process:
    return
  if bar is not None:
    bar.write(text)
  else:
    print(text)
