"""Shared command-line plumbing for train.py (and later serve.py): config flags with one-line errors.

ml_collections' `config_flags` parses `--config=path --config.a.b=value`; its failures surface as KeyError,
AttributeError or OSError tracebacks from deep inside the flag machinery. These helpers turn every such failure
(unknown field, bad value, missing file, impossible combination) into `error: ...` on one line and exit code 2.
"""
from __future__ import annotations

import re
import sys
from typing import NoReturn, Sequence

from absl import flags
from absl import logging as absl_logging
import ml_collections
from ml_collections import config_flags

from dsjax import config as config_lib


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
  except OSError as e:
    cause = str(e.__cause__ or e)
    match = re.search(r'Attempted \[[^\]]*\]:\s*(\S+)\s*(.*)', cause, re.S)
    fail(f'cannot load config file {match.group(1)}: {match.group(2)}' if match else cause)
  except config_lib.ConfigError as e:
    fail(str(e))
  return cfg
