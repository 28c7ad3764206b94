"""Shared command-line plumbing for train.py, sample.py and serve.py: config flags with one-line errors, and the
flags that say how a checkpoint's model is loaded (dtype, quantization, a LoRA adapter).

ml_collections' `config_flags` parses `--config=path --config.a.b=value`; its failures surface as KeyError,
AttributeError or OSError tracebacks from deep inside the flag machinery. These helpers turn every such failure
(unknown field, bad value, missing file, impossible combination) into `error: ...` on one line and exit code 2.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any, NamedTuple, NoReturn, Sequence

from absl import flags
from absl import logging as absl_logging
import ml_collections
from ml_collections import config_flags

from dsjax import config as config_lib
from dsjax import checkpoint
from dsjax import lora
from dsjax import quant
from dsjax.data import pipeline
from dsjax.model import Transformer
from dsjax.model import layout

# The flags the helpers below define belong to the program that calls them (absl gives a flag to the first module
# on the stack that has not disclaimed), so that `python sample.py --help` lists --quant, --adapter, --dtype ...
flags.disclaim_key_flags()


def fail(message: str) -> NoReturn:
  """Prints a one-line error and exits with status 2 (a usage error)."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(2)


def _unknown_field_message(error: Exception, argv: Sequence[str]) -> str:
  """`'stepz' Did you mean "steps"...` -> `unknown config field config.train.stepz (did you mean "steps"?)`."""
  while error.args and isinstance(error.args[0], Exception):
    error = error.args[0]  # AttributeError(KeyError(...)) as raised by ConfigDict
  text = str(error.args[0] if error.args else error)
  key = text.split('\n')[0].strip('\'"')
  hint = re.search(r'Did you mean "([^"]+)"', text)
  hint = f' (did you mean {hint.group(1)!r}?)' if hint else ''
  for arg in argv:
    flag = arg.split('=', 1)[0].lstrip('-')
    if flag.startswith('config.') and re.search(rf'(^|\.){re.escape(key)}(\.|$)', flag[len('config.'):]):
      return f'unknown config field {flag}{hint}'
  return f'unknown config field {key!r}{hint}'


def quiet_logging() -> None:
  """Shows warnings and errors only, unless `--verbosity` was given (absl's default, INFO, prints every
  accelerator backend JAX probes and fails to find). Call after flag parsing."""
  if not flags.FLAGS['verbosity'].present:
    absl_logging.set_verbosity(absl_logging.WARNING)


def define_config_flag(default: str, name: str = 'config') -> flags.FlagHolder:
  """Defines `--config` (a configs/*.py file, locked so typos fail) with one-line errors for bad overrides."""
  try:
    return config_flags.DEFINE_config_file(name, default, 'Path to a configs/*.py file.', lock_config=True)
  except (KeyError, AttributeError) as e:
    fail(_unknown_field_message(e, sys.argv))


def default_workdir(config_path: str) -> str:
  """runs/<config name>: the file's stem (configs/tiny.py -> runs/tiny); a checkpoint's config.py
  (runs/tiny/checkpoint/config.py) -> runs/tiny-continued, so a new run never writes into the one it starts from."""
  path = os.path.abspath(config_path.split(':')[0])
  stem = os.path.splitext(os.path.basename(path))[0]
  if stem == 'config' and os.path.isfile(os.path.join(os.path.dirname(path), checkpoint.CONFIG_JSON)):
    folder = os.path.dirname(path)
    run = os.path.basename(os.path.dirname(folder)) if os.path.basename(folder) == 'checkpoint' else (
        os.path.basename(folder))
    stem = f'{run}-continued'
  return os.path.join('runs', stem)


def with_default_workdir(cfg: ml_collections.ConfigDict, holder: flags.FlagHolder,
                         argv: Sequence[str]) -> ml_collections.ConfigDict:
  """`train.workdir` = runs/<config name> (`default_workdir`) unless the config or a --config.train.workdir
  override (even an empty one: save nothing) sets it."""
  if cfg.train.workdir or any(a.split('=')[0] == f'--{holder.name}.train.workdir' for a in argv):
    return cfg
  cfg.train.workdir = default_workdir(flags.FLAGS[holder.name].config_filename)
  return cfg


def parse_flags(argv: Sequence[str]) -> list[str]:
  """An `app.run(..., flags_parser=parse_flags)` parser that reports bad flags on one line."""
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:
    fail(_unknown_field_message(e, argv))
  except flags.Error as e:
    fail(str(e))


def resolve_config(holder: flags.FlagHolder) -> ml_collections.ConfigDict:
  """The loaded, overridden and validated config, or a one-line error."""
  try:
    cfg = holder.value
    config_lib.validate(cfg)  # first access to a config file that failed to load raises OSError here
    pipeline.validate_config(cfg.data)
  except OSError as e:
    cause = str(e.__cause__ or e)
    match = re.search(r'Attempted \[[^\]]*\]:\s*(\S+)\s*(.*)', cause, re.S)
    fail(f'cannot load config file {match.group(1)}: {match.group(2)}' if match else cause)
  except config_lib.ConfigError as e:
    fail(str(e))
  return cfg


class ModelFlags(NamedTuple):
  """Flags of sample.py and serve.py that change how a checkpoint's model is loaded (`define_model_flags`)."""
  dtype: flags.FlagHolder
  quant: flags.FlagHolder
  quant_group_size: flags.FlagHolder
  quant_activations: flags.FlagHolder
  adapter: flags.FlagHolder


def define_model_flags() -> ModelFlags:
  """Defines --dtype, --quant, --quant_group_size, --quant_activations and --adapter."""
  return ModelFlags(
      dtype=flags.DEFINE_string('dtype', None, 'Compute dtype override, e.g. float32 (default: the checkpoint\'s).'),
      quant=flags.DEFINE_string('quant', None, 'Weight-only quantization: none | int8 (per channel) | int4 '
                                '(group-wise); sets config.quant.mode (default: the checkpoint\'s, normally none).'),
      quant_group_size=flags.DEFINE_integer('quant_group_size', None, 'int4: weights per scale along the input '
                                            'dimension (config.quant.group_size, default 128).'),
      quant_activations=flags.DEFINE_bool('quant_activations', None, 'With --quant=int8: int8 activations too, '
                                          'int8 x int8 matmuls (config.quant.activations).'),
      adapter=flags.DEFINE_string('adapter', '', 'A LoRA adapter directory (PEFT format, e.g. <workdir>/adapter of '
                                  'a lora.enabled run) merged into the checkpoint\'s weights.'))


def checkpoint_config(directory: str, model_flags: ModelFlags) -> ml_collections.ConfigDict:
  """The config saved with a checkpoint, with the --dtype and --quant* overrides applied (validate it after any
  further changes). Raises FileNotFoundError / ConfigError."""
  cfg = checkpoint.load_config(directory)
  if model_flags.dtype.value:
    cfg.model.dtype = model_flags.dtype.value
  for holder, field in ((model_flags.quant, 'mode'), (model_flags.quant_group_size, 'group_size'),
                        (model_flags.quant_activations, 'activations')):
    if holder.value is not None:
      cfg.quant[field] = holder.value
  return cfg


def load_model(directory: str, cfg: ml_collections.ConfigDict, model_flags: ModelFlags) -> tuple[Any, Any]:
  """(model, params) to run a checkpoint with: its params with the --adapter merged in, quantized as cfg.quant
  says, in the decoding layout (dsjax/model/layout.py: converted once here, not per call), and the model (wrapped
  for int8 activations when asked). Raises FileNotFoundError / ValueError."""
  params = checkpoint.load_params(directory, cfg.model)
  if model_flags.adapter.value:
    params = lora.merge_peft(params, cfg.model, model_flags.adapter.value)
  params = quant.quantize_params(params, cfg.model, cfg.quant)  # no-op for quant.mode=none
  params = layout.for_decoding(params)
  return quant.quantize_model(Transformer(cfg.model), cfg.quant), params
