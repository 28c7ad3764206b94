"""Multi-process start-up: `initialize` joins this process to the others of a multi-host run (see docs/multihost.md).

It must run before anything initialises a JAX backend (jax.devices(), the first array or computation). With no
flags and no cluster in the environment it does nothing, so one-process runs need no distributed runtime.
"""
from __future__ import annotations

import importlib.util
import os
import urllib.request

import jax

_FLAGS = ('--coordinator_address', '--num_processes', '--process_id')
_TPU_METADATA = 'http://metadata.google.internal/computeMetadata/v1/instance/attributes/worker-network-endpoints'


def initialize(coordinator_address: str = '', num_processes: int = 0, process_id: int = -1) -> None:
  """Starts JAX's distributed runtime when this is one process of several.

  All three arguments given: those (e.g. `127.0.0.1:1234`, 2, 0). None given: `jax.distributed.initialize()` with
  JAX's own auto-detection when the environment is a multi-process launch (SLURM `srun` with several tasks, a
  multi-host Cloud TPU slice, JAX_COORDINATOR_ADDRESS set); otherwise nothing. Some but not all: ValueError.
  """
  given = [coordinator_address != '', num_processes != 0, process_id != -1]
  if any(given) and not all(given):
    missing = ', '.join(flag for flag, present in zip(_FLAGS, given) if not present)
    raise ValueError(f'{", ".join(_FLAGS[:2])} and {_FLAGS[2]} must be given together (missing: {missing})')
  if all(given):
    if ':' not in coordinator_address:
      raise ValueError(f'--coordinator_address={coordinator_address!r}: expected host:port')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id}: must be in [0, --num_processes={num_processes})')
  elif not multi_process_environment():
    return
  if jax.distributed.is_initialized():
    return
  if _cpu_only():
    # Cross-process collectives on CPU (tests, CPU clusters) need an implementation; gloo runs over TCP.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if all(given):
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()


def multi_process_environment() -> bool:
  """Whether the environment says this is one of several processes that JAX can find on its own."""
  env = os.environ
  if int(env.get('SLURM_NTASKS', '1') or 1) > 1:
    return True
  if env.get('JAX_COORDINATOR_ADDRESS') or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return True
  return _tpu_slice_hosts() > 1


def _tpu_slice_hosts() -> int:
  """Hosts of this Cloud TPU slice: from the environment (GKE sets TPU_WORKER_HOSTNAMES) or, on a TPU VM, from the
  instance metadata, where `gcloud compute tpus tpu-vm ssh --worker=all` leaves them (JAX reads the same key)."""
  hosts = os.environ.get('TPU_PROCESS_ADDRESSES') or os.environ.get('TPU_WORKER_HOSTNAMES')
  if hosts is None and importlib.util.find_spec('libtpu') is not None and not _cpu_only():
    request = urllib.request.Request(_TPU_METADATA, headers={'Metadata-Flavor': 'Google'})
    try:
      with urllib.request.urlopen(request, timeout=2) as response:
        hosts = response.read().decode()
    except OSError:  # not a GCE TPU VM (no metadata server, or no such key)
      return 1
  return len([h for h in (hosts or '').split(',') if h.strip()])


def _cpu_only() -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS names only cpu, or no accelerator plugin is installed."""
  platforms = [p.strip() for p in (jax.config.jax_platforms or '').split(',') if p.strip()]
  if platforms:
    return set(platforms) == {'cpu'}
  plugins = importlib.util.find_spec('jax_plugins') is not None or importlib.util.find_spec('libtpu') is not None
  return not plugins
