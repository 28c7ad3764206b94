"""Train a dsjax model: `python train.py --config=configs/tiny.py [--config.section.field=value ...]`.

A thin CLI: parse and validate the config, join the other processes of a multi-host run (docs/multihost.md), then
call dsjax.experiment.train. The run's files go to `train.workdir`, by default runs/<config name>.
"""
import sys

from absl import app
from absl import flags
import jax

from dsjax import cli
from dsjax import config as config_lib
from dsjax import distributed

_CONFIG = cli.define_config_flag('configs/tiny.py')
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', '', 'Multi-process runs: host:port of process 0 (with --num_processes and --process_id). '
    'Empty: auto-detected under SLURM and on Cloud TPU slices, else a single process.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Multi-process runs: the number of processes (0: unset).')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'Multi-process runs: this process, 0..num_processes-1 '
                                   '(-1: unset).')


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.quiet_logging()
  cfg = cli.with_default_workdir(cli.resolve_config(_CONFIG), _CONFIG, sys.argv)
  try:
    distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except (ValueError, RuntimeError) as e:  # bad flags, or JAX could not reach the other processes
    cli.fail(str(e))
  from dsjax import experiment  # pylint: disable=g-import-not-at-top  (after flag parsing: bad flags fail fast)
  from dsjax.train import loop  # pylint: disable=g-import-not-at-top
  try:
    summary = experiment.train(cfg)
  except (config_lib.ConfigError, FileNotFoundError, loop.TrainingDiverged) as e:
    cli.fail(str(e))
  if jax.process_index() == 0:
    print(experiment.where_to_look(cfg, summary))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
