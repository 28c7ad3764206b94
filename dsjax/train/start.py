"""How a run starts: its config checked against the mesh and the workdir, the model it trains and where its params
start, and the lines that say so.

  model_for_run(cfg)                                 the Transformer, or a LoraModel with `lora.enabled`
  initial_params(cfg, model, rng, mesh, shardings)   a fresh init, the checkpoint `train.init_from`, or for LoRA
                                                     that base with adapters (`lora.adapter` or fresh; int8 base)
"""
from __future__ import annotations

import os
from typing import Any

from flax import linen as nn
import jax
import ml_collections

from dsjax import checkpoint
from dsjax import config as config_lib
from dsjax import lora as lora_lib
from dsjax import quant
from dsjax import sharding as sharding_lib
from dsjax.model import Transformer
from dsjax.train import partition
from dsjax.train import state as state_lib

_ARCHITECTURE = ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim',
                 'tie_embeddings')


def checkpoint_params(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Any:
  """The params of the checkpoint `train.init_from`, checked against `cfg.model` (any mismatch names the field),
  placed on `mesh` when given (each device reads only its shards)."""
  saved = checkpoint.load_config(cfg.train.init_from).model
  for field in _ARCHITECTURE:
    if saved[field] != cfg.model[field]:
      raise config_lib.ConfigError(f'config.model.{field}={cfg.model[field]!r}: the checkpoint in '
                                   f'train.init_from={cfg.train.init_from!r} has {saved[field]!r}')
  return checkpoint.load_params(cfg.train.init_from, cfg.model, mesh, cfg.mesh if mesh is not None else None)


def model_for_run(cfg: ml_collections.ConfigDict) -> Any:
  """The model a run trains: the Transformer, wrapped with LoRA adapters (dsjax.lora.LoraModel) with `lora.enabled`."""
  model = Transformer(cfg.model)
  spec = lora_lib.spec_for_run(cfg)
  return model if spec is None else lora_lib.LoraModel(model, spec)


def abstract_params(cfg: ml_collections.ConfigDict, model: Any) -> Any:
  """Boxed ShapeDtypeStructs of the params the run trains (a LoRA run's int8 base as QTensors)."""
  params = jax.eval_shape(lambda rng: state_lib.init_params(model, rng, cfg.data.seq_len), jax.random.key(0))
  if isinstance(model, lora_lib.LoraModel) and model.spec.base_int8:
    params = jax.eval_shape(lambda p: lora_lib.quantize_base(p, cfg.model), params)
  return params


def initial_params(cfg: ml_collections.ConfigDict, model: Any, rng: jax.Array, mesh: jax.sharding.Mesh,
                   shardings: Any) -> Any:
  """The params at step 0, created in their `shardings`: a fresh init from `rng`, or `train.init_from`'s; a LoRA
  model gets the adapters of `lora.adapter` (or fresh ones from `rng`) on that base."""
  if not isinstance(model, lora_lib.LoraModel):
    if cfg.train.init_from:
      return checkpoint_params(cfg, mesh)
    return jax.jit(lambda r: nn.meta.unbox(state_lib.init_params(model, r, cfg.data.seq_len)),
                   out_shardings=shardings)(rng)
  adapters = None
  if cfg.lora.adapter:
    try:
      _, adapters = lora_lib.load_peft(cfg.lora.adapter, cfg.model)
    except (ValueError, FileNotFoundError) as e:
      raise config_lib.ConfigError(f'config.lora.adapter={cfg.lora.adapter!r}: {e}') from e
  if cfg.train.init_from:
    base = checkpoint_params(cfg, mesh)
  else:
    base = jax.jit(lambda r: nn.meta.unbox(state_lib.init_params(model.model, r, cfg.data.seq_len)))(rng)
  params = lora_lib.add_adapters(base, cfg.model, model.spec, rng, adapters)
  return quant.names_like(shardings, params)  # the int8 base's axis names, as its shardings carry them


def check(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, num_shards: int) -> None:
  """ConfigErrors naming the field: heads or microbatches the mesh does not divide, data shards the processes do not
  divide, and a workdir whose outputs would overwrite a checkpoint the run reads (its init, adapter or teacher)."""
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
  if not cfg.train.workdir:
    return
  workdir = os.path.abspath(cfg.train.workdir)
  writes = [os.path.join(workdir, name) for name in ('checkpoint', 'adapter', 'checkpoints')]
  for field, source in (('train.init_from', cfg.train.init_from), ('distill.teacher', cfg.distill.teacher),
                        ('lora.adapter', cfg.lora.adapter if cfg.lora.enabled else '')):
    source = os.path.abspath(source) if source else ''
    if source and any(source == w or source.startswith(w + os.sep) for w in writes):
      raise config_lib.ConfigError(f'config.train.workdir={cfg.train.workdir!r}: the run would overwrite '
                                   f'config.{field}={source!r}, which it reads; choose another workdir')


def describe(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, params: Any, mask: Any,
             resume_step: int | None, mfu_known: bool) -> str:
  """The run's opening lines: model, data per step, mesh, what trains, where it started from."""
  num_params = state_lib.param_count(params)
  m = cfg.model
  architecture = ''
  if m.mla.kv_lora_rank:
    architecture += f', latent attention (rank {m.mla.kv_lora_rank})'
  if m.moe.num_experts:
    architecture += (f', MoE {m.moe.num_experts} experts top-{m.moe.top_k} + {m.moe.num_shared_experts} shared '
                     f'({m.moe.scoring}, {m.moe.topk_method})')
  if m.mtp.num_layers:
    architecture += f', {m.mtp.num_layers} MTP depth(s)'
  lines = [f'model: {num_params:,} parameters; attention={m.attention.kind}, positions={m.positions.kind}'
           f'{architecture}; {cfg.train.batch_size * cfg.data.seq_len:,} tokens per step; mesh '
           f'{dict(mesh.shape)} over {jax.process_count()} process(es)']
  trainable = state_lib.param_count(partition.split(params, mask)[0])
  if trainable != num_params:
    spec = lora_lib.spec_for_run(cfg)
    lines.append(f'trainable: {trainable:,} of {num_params:,} parameters (train.trainable='
                 f'{partition.spec_for_run(cfg)!r})' + (f'; LoRA rank {spec.rank}, targets {",".join(spec.targets)}'
                                                        + (', int8 base' if spec.base_int8 else '') if spec else ''))
  if resume_step is not None:
    lines.append(f'resumed at step {resume_step} from {os.path.join(cfg.train.workdir, "checkpoints")}')
  for what, source in (('initialised from', cfg.train.init_from), ('distilled from teacher', cfg.distill.teacher),
                       ('LoRA adapter from', cfg.lora.adapter if cfg.lora.enabled else '')):
    if source:
      lines.append(f'{what} {source}')
  if not mfu_known:
    lines.append(f'MFU: not reported (no peak FLOP/s known for device kind {jax.devices()[0].device_kind!r}; set '
                 'config.train.peak_flops_per_device)')
  return '\n'.join(lines)
