"""Test setup: 8 fake CPU devices so that meshes can be tested without accelerators, fast XLA compiles, and the
`gpu` tier skipped (with its reason) where no GPU is present.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before anything touches jax devices.
"""
import os
import shutil
import tempfile

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  _flags += ' --xla_force_host_platform_device_count=8'
# The test graphs are tiny: XLA's CPU backend optimisation (LLVM -O2, fusion emitters) costs far more compile time
# than it saves at run time (a train step of the tiny model compiles in ~1/3 of the time). Numerics are unchanged:
# these flags choose how the same HLO is turned into machine code. tests/model/helpers.FAST_COMPILE is the per-jit
# form of the same options.
for _flag in ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true',
              '--xla_cpu_use_fusion_emitters=false'):
  if _flag.split('=')[0] not in _flags:
    _flags += ' ' + _flag
os.environ['XLA_FLAGS'] = _flags.strip()
_OWN_CACHE = []  # the compilation cache directory this process created, removed at the end


def pytest_configure(config):
  """One JAX compilation cache for the whole run, shared by the xdist workers (they inherit this environment), so
  a computation two workers both compile (a shared reference model, the same train step) compiles once."""
  del config
  if 'PYTEST_XDIST_WORKER' not in os.environ and 'DSJAX_TEST_COMPILATION_CACHE' not in os.environ:
    path = tempfile.mkdtemp(prefix='dsjax-test-jax-')
    _OWN_CACHE.append(path)
    os.environ['DSJAX_TEST_COMPILATION_CACHE'] = path
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', os.environ['DSJAX_TEST_COMPILATION_CACHE'])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def pytest_unconfigure(config):
  del config
  for path in _OWN_CACHE:  # the controller made it; the workers are gone by now
    shutil.rmtree(path, ignore_errors=True)


def _has_gpu() -> bool:
  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS is set)
  try:
    return bool(jax.devices('gpu'))
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  """Tests marked `gpu` need a GPU: without one they are skipped with the reason (pytest -ra prints it)."""
  del config
  gpu_items = [item for item in items if item.get_closest_marker('gpu')]
  if gpu_items and not _has_gpu():
    skip = pytest.mark.skip(reason='needs a GPU (JAX sees none): run `python bench/device_check.py` on a GPU machine, '
                            'or `JAX_PLATFORMS=cuda,cpu python -m pytest -m gpu` there')
    for item in gpu_items:
      item.add_marker(skip)
