"""Multi-process training: two real processes on localhost (2 fake CPU devices each) train exactly like one
process with the same 4 devices, save a checkpoint together and resume from it; plus dsjax.distributed's checks.

Every run goes through train.py in a subprocess (JAX_PLATFORMS=cpu, gloo collectives), so the flags, the
distributed start-up, the per-process data shards, process 0's metrics.jsonl and orbax's collective checkpoints
are all exercised.
"""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator

import jax
import numpy as np
import pytest

from dsjax import distributed
from dsjax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A shrunk configs/tiny.py. warmup_steps=1 makes the learning rate of the first two updates (0, then the peak) the
# same for train.steps=2 and 4, so a 2-step run resumed to 4 steps follows the 4-step schedule exactly.
SMALL = ('--config=configs/tiny.py', '--config.model.hidden_size=64', '--config.model.num_layers=2',
         '--config.model.num_heads=4', '--config.model.num_kv_heads=2', '--config.model.mlp_dim=160',
         '--config.data.seq_len=64', '--config.data.eval_batches=2', '--config.train.batch_size=8',
         '--config.train.log_every=1', '--config.train.eval_every=1000', '--config.train.num_samples=0',
         '--config.train.progress_bar=False', '--config.train.tensorboard=False',
         '--config.train.checkpoint_every=0', '--config.optim.learning_rate=1e-2', '--config.optim.warmup_steps=1')
STEPS = 4
# Two processes reduce gradients across processes with gloo, one process inside XLA: the same sums in a different
# order, so float32 results agree to rounding (measured: ~1e-7 relative on the losses, ~1e-7 absolute on params).
RTOL, PARAM_ATOL = 1e-5, 1e-5
_CLUSTER_ENV = ('SLURM_', 'TPU_', 'MEGASCALE_', 'JAX_COORDINATOR', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def _env(devices: int) -> dict[str, str]:
  """A child's environment: CPU only, `devices` fake devices, and no cluster variables (no auto-detection)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_ENV)}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _launch(name: str, commands: list[list[str]], devices: int, log_dir) -> Iterator[list[subprocess.Popen]]:
  """Starts `train.py <command>` for each command (output in log_dir/<name>.<i>.log); kills what is left on exit."""
  procs = []
  try:
    for i, command in enumerate(commands):
      with open(log_dir / f'{name}.{i}.log', 'w') as log:
        procs.append(subprocess.Popen([sys.executable, 'train.py', *command], cwd=ROOT, env=_env(devices),
                                      stdout=log, stderr=subprocess.STDOUT))
    yield procs
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _wait(name: str, procs: list[subprocess.Popen], log_dir, timeout: float = 150.0) -> None:
  """Waits for `procs` to exit 0; fails (killing the rest) as soon as one fails or the time is up."""
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    if any(p.returncode for p in procs):
      break  # the others would wait for the failed one until JAX's timeouts
    time.sleep(0.1)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  failed = {i: p.returncode for i, p in enumerate(procs) if p.returncode}
  logs = [(log_dir / f'{name}.{i}.log').read_text()[-3000:] for i in range(len(procs))]
  assert not failed, f'{name}: exit codes {failed} (killed if < 0; timeout {timeout} s)\n' + '\n'.join(
      f'--- process {i}:\n{log}' for i, log in enumerate(logs))


def _run(name: str, commands: list[list[str]], devices: int, log_dir) -> None:
  with _launch(name, commands, devices, log_dir) as procs:
    _wait(name, procs, log_dir)


def _two_processes(steps: int, workdir) -> list[list[str]]:
  address = f'127.0.0.1:{_free_port()}'
  return [[*SMALL, f'--config.train.steps={steps}', '--config.data.num_shards=2', f'--config.train.workdir={workdir}',
           f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}'] for i in range(2)]


def _records(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _losses(records: list[dict], split: str) -> dict[int, float]:
  return {r['step']: r['loss'] for r in records if r['split'] == split}


def _params(workdir) -> dict[str, np.ndarray]:
  """The final model's params (written collectively by the processes), restored here onto one device."""
  directory = os.path.join(workdir, 'checkpoint')
  params = checkpoint.load_params(directory, checkpoint.load_config(directory).model)
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.slow  # ~45 s on 2 cores (four launches of train.py)
def test_two_processes_train_save_and_resume_like_one_process(tmp_path):
  one, other_data, two = tmp_path / 'one', tmp_path / 'one_shard', tmp_path / 'two'
  # References, side by side: one process over the same 4 devices and the same 2 data shards (the same global
  # batches), and one reading a single shard (different batches: shows the comparison below can fail).
  _run('one_process', [[*SMALL, f'--config.train.steps={STEPS}', f'--config.data.num_shards={n}',
                        f'--config.train.workdir={d}'] for n, d in ((2, one), (1, other_data))], 4, tmp_path)
  # Two processes: 2 steps, a collective checkpoint at the end, then a second launch resumes it to step 4.
  _run('two_processes', _two_processes(2, two), 2, tmp_path)
  assert sorted(os.listdir(two / 'checkpoints' / '2' / 'data')) == [
      'commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']  # each process's data iterator state
  _run('two_processes_resumed', _two_processes(STEPS, two), 2, tmp_path)

  records, expected = _records(two), _records(one)
  # Only process 0 writes metrics: one record per split and step.
  assert len({(r['split'], r['step']) for r in records}) == len(records), records
  losses, expected_losses = _losses(records, 'train'), _losses(expected, 'train')
  assert sorted(losses) == sorted(expected_losses) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                             [expected_losses[s] for s in sorted(losses)], rtol=RTOL)
  np.testing.assert_allclose(_losses(records, 'validation')[STEPS], _losses(expected, 'validation')[STEPS],
                             rtol=RTOL)
  other = _losses(_records(other_data), 'train')
  assert max(abs(other[s] / expected_losses[s] - 1) for s in other) > 100 * RTOL, (other, expected_losses)
  params, expected_params = _params(two), _params(one)
  assert sorted(params) == sorted(expected_params)
  for key, value in params.items():
    np.testing.assert_allclose(value, expected_params[key], rtol=0, atol=PARAM_ATOL, err_msg=key)


@pytest.mark.slow  # ~17 s on 2 cores; with it the default run of this file would approach 90 s
def test_sigterm_on_one_process_stops_both_at_the_same_step_after_a_checkpoint(tmp_path):
  """JAX's preemption service: a SIGTERM to process 1 alone makes both processes agree on a step, save it, exit 0."""
  workdir = tmp_path / 'two'
  with _launch('preempted', _two_processes(100_000, workdir), 2, tmp_path) as procs:
    deadline = time.monotonic() + 120
    while not (workdir / 'metrics.jsonl').exists():  # process 0 logged step 1: both are past compilation
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), 'no step logged'
      time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    _wait('preempted', procs, tmp_path, timeout=60)
  log = (tmp_path / 'preempted.0.log').read_text()
  step = int(re.search(r'preempted \(SIGTERM\): stopping after step (\d+)', log).group(1))
  assert os.listdir(workdir / 'checkpoints') == [str(step)]
  assert sorted(os.listdir(workdir / 'checkpoints' / str(step) / 'data')) == [
      'commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']
  assert max(r['step'] for r in _records(workdir)) == step
  assert not (workdir / 'checkpoint').exists()  # a preempted run does not write the final model


@pytest.mark.parametrize('args, missing', [
    (('127.0.0.1:1234', 0, -1), '--num_processes, --process_id'),
    (('', 2, 0), '--coordinator_address'),
    (('', 0, 1), '--coordinator_address, --num_processes'),
])
def test_initialize_rejects_an_incomplete_set_of_flags(args, missing):
  with pytest.raises(ValueError, match=f'must be given together \\(missing: {missing}\\)'):
    distributed.initialize(*args)


def test_initialize_checks_the_flags_values():
  with pytest.raises(ValueError, match='host:port'):
    distributed.initialize('localhost', 2, 0)
  with pytest.raises(ValueError, match='--process_id=2'):
    distributed.initialize('127.0.0.1:1234', 2, 2)


@pytest.fixture
def no_cluster_env(monkeypatch):
  """This test process's environment without any variable a cluster launcher sets."""
  for key in list(os.environ):
    if key.startswith(_CLUSTER_ENV):
      monkeypatch.delenv(key)


@pytest.mark.parametrize('env, expected', [
    ({}, False),
    ({'SLURM_NTASKS': '1'}, False),
    ({'SLURM_NTASKS': '4'}, True),
    ({'TPU_WORKER_HOSTNAMES': 'host0'}, False),
    ({'TPU_WORKER_HOSTNAMES': 'host0,host1'}, True),
    ({'MEGASCALE_COORDINATOR_ADDRESS': 'host0:8080'}, True),
    ({'JAX_COORDINATOR_ADDRESS': 'host0:1234'}, True),
])
def test_multi_process_environment(monkeypatch, no_cluster_env, env, expected):
  del no_cluster_env
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  assert distributed.multi_process_environment() is expected


def test_single_process_initialize_is_a_no_op(no_cluster_env):
  del no_cluster_env
  distributed.initialize()
  assert not jax.distributed.is_initialized()


def test_train_py_reports_bad_distributed_flags_on_one_line():
  result = subprocess.run([sys.executable, 'train.py', '--num_processes=2'], cwd=ROOT, env=_env(1),
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines() == [
      'error: --coordinator_address, --num_processes and --process_id must be given together '
      '(missing: --coordinator_address, --process_id)']
