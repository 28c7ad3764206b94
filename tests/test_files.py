"""dsjax.files.save_safetensors: the file mode follows the umask, the content round-trips, a failed write leaves
nothing behind."""
import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from dsjax import files

TENSORS = {'a': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.array([1, -2], np.int8)}


@pytest.fixture
def umask():
  """Sets the process umask for one test and restores it afterwards."""
  old = os.umask(0o022)
  os.umask(old)
  yield lambda mask: os.umask(mask)
  os.umask(old)


@pytest.mark.parametrize('mask,mode', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_mode_follows_the_umask_like_a_new_file(tmp_path, umask, mask, mode):
  umask(mask)
  assert files.umask() == mask
  path = tmp_path / 'model.safetensors'
  files.save_safetensors(TENSORS, str(path))
  with open(tmp_path / 'config.json', 'w'):
    pass
  assert os.stat(path).st_mode & 0o777 == mode == os.stat(tmp_path / 'config.json').st_mode & 0o777
  assert os.umask(mask) == mask  # reading the umask did not change it


def test_content_and_metadata_round_trip_and_overwrite(tmp_path):
  path = str(tmp_path / 'w.safetensors')
  files.save_safetensors({'old': np.zeros(3, np.float32)}, path)
  files.save_safetensors(TENSORS, path, metadata={'format': 'pt'})
  loaded = load_file(path)
  assert set(loaded) == set(TENSORS)
  for name, value in TENSORS.items():
    np.testing.assert_array_equal(loaded[name], value)
    assert loaded[name].dtype == value.dtype
  with safe_open(path, framework='numpy') as f:
    assert f.metadata() == {'format': 'pt'}
  assert os.listdir(tmp_path) == ['w.safetensors']  # no temporary file left


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
  path = tmp_path / 'w.safetensors'
  with pytest.raises(Exception):
    files.save_safetensors({'bad': np.array([object()])}, str(path))  # object arrays cannot be serialized
  assert os.listdir(tmp_path) == []
  files.save_safetensors(TENSORS, str(path))
  with pytest.raises(Exception):
    files.save_safetensors({'bad': np.array([object()])}, str(path))
  assert os.listdir(tmp_path) == ['w.safetensors']
  np.testing.assert_array_equal(load_file(str(path))['a'], TENSORS['a'])


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
  def half_write(tensors, path, metadata=None):
    with open(path, 'wb') as f:
      f.write(b'\x08\x00\x00')
    raise OSError('disk full')
  monkeypatch.setattr(files, 'save_file', half_write)
  with pytest.raises(OSError, match='disk full'):
    files.save_safetensors(TENSORS, str(tmp_path / 'w.safetensors'))
  assert os.listdir(tmp_path) == []
