"""Writing files the way users expect: atomically (no partial file under the final name) and with the permissions
their umask gives any new file (safetensors' own writer leaves 0600). Layer 0: imports nothing from dsjax."""
from __future__ import annotations

import os
import tempfile

import numpy as np
from safetensors.numpy import save_file


def umask() -> int:
  """The process's umask, read without changing it (from /proc on Linux; elsewhere set and restored at once)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def save_safetensors(tensors: dict[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
  """Writes `tensors` as a safetensors file at `path`: into a temporary file in the same directory, given mode
  0o666 & ~umask (what `open(path, 'w')` would give), then renamed over `path`. On any error nothing is left."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  os.close(fd)
  try:
    save_file(tensors, tmp, metadata=metadata)
    os.chmod(tmp, 0o666 & ~umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
