"""Checkpoints of a training run, for exact resume: `<workdir>/checkpoints/<step>/`, written by an orbax
CheckpointManager.

Each step directory holds three items:
  state/  the TrainState (params, optimizer state, counters), an orbax PyTree checkpoint that each process writes
          its own shards of, restorable onto any mesh (each device reads only the shards it needs);
  data/   the data iterator state, one JSON file per process (grain's orbax handler);
  meta/   JSON: the step, the run's config and the host-side metrics state (the unigram baseline's counts).

Saves are asynchronous: `save` returns once the arrays are copied to host memory and the files are written in the
background. orbax writes into a temporary directory and renames it when complete, so a crash in the middle of a
write leaves the previous checkpoints intact and `latest_step` never returns a partial one. Retention: the latest
`keep_checkpoints` plus the `keep_best` with the lowest held-out loss.
"""
from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

EVAL_LOSS = 'eval_loss'


class _FrozenIteratorState:
  """The data iterator's state captured when `save` is called: the background write must not see later batches."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    return self._state


class TrainCheckpointer:
  """Saves and restores (TrainState, data iterator, metadata) triples under one directory."""

  def __init__(self, directory: str, train_cfg: ml_collections.ConfigDict):
    policies = [preservation.LatestN(n=max(int(train_cfg.keep_checkpoints), 1))]
    if train_cfg.keep_best:
      policies.append(preservation.BestN(get_metric_fn=lambda metrics: metrics[EVAL_LOSS], reverse=True,
                                         n=int(train_cfg.keep_best), keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(preservation_policy=preservation.AnyPreservationPolicy(policies),
                                           enable_async_checkpointing=True, create=True)
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'data', 'meta'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any],
           eval_loss: float | None = None) -> None:
    """Starts an asynchronous save of `state` (a pytree of jax arrays), the iterator's state and `meta` (JSON)."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_iterator.get_state())),
        meta=ocp.args.JsonSave(meta))
    metrics = None if eval_loss is None else {EVAL_LOSS: float(eval_loss)}
    self._manager.save(step, args=args, metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, dict[str, Any]]:
    """Restores step `step` into the shapes, dtypes and shardings of `abstract_state` (ShapeDtypeStructs with
    shardings: the current mesh, whatever mesh wrote it) and sets `data_iterator`'s state. Returns (state, meta).

    Raises ValueError when the data iterator state was written by a different number of processes.
    """
    data_file = os.path.join(self.directory, str(step), 'data',
                             f'process_{jax.process_index()}-of-{jax.process_count()}.json')
    if not os.path.isfile(data_file):
      raise ValueError(f'checkpoint {step} in {self.directory} has no data iterator state for process '
                       f'{jax.process_index()} of {jax.process_count()}: resume with the number of processes that '
                       'wrote it (the model state itself restores onto any mesh)')
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
        meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def wait(self) -> None:
    """Blocks until the pending asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_state(shardings: Any, example: Any) -> Any:
  """ShapeDtypeStructs of `example` (a pytree of arrays or ShapeDtypeStructs) placed with `shardings`."""
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), example, shardings)


def config_json(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON data, for the checkpoint's meta item."""
  return json.loads(cfg.to_json())
