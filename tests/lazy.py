"""Heavy optional modules (torch, transformers, peft) imported on first use rather than at collection: both xdist
workers collect every test module, and importing these costs ~12 s of CPU per worker, while only the worker that
runs the parity tests needs them."""
import importlib
from types import ModuleType


class LazyModule(ModuleType):
  """Imports the module `name` the first time one of its attributes is read."""

  def __init__(self, name: str):
    super().__init__(name)
    self._module = None

  def __getattr__(self, attr: str):
    if attr.startswith('_'):  # collection probes private and dunder names of module globals: answer without importing
      raise AttributeError(attr)
    if self._module is None:
      self._module = importlib.import_module(self.__name__)
    return getattr(self._module, attr)


torch = LazyModule('torch')
transformers = LazyModule('transformers')
peft = LazyModule('peft')
