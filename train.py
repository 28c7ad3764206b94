"""Train a dsjax model: `python train.py --config=configs/tiny.py [--config.section.field=value ...]`.

A thin CLI: parse and validate the config, then call dsjax.train.loop.train.
"""
from absl import app

from dsjax import cli
from dsjax import config as config_lib

_CONFIG = cli.define_config_flag('configs/tiny.py')


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.quiet_logging()
  cfg = cli.resolve_config(_CONFIG)
  from dsjax.train import loop  # imported after flag parsing so that bad flags fail fast
  try:
    loop.train(cfg)
  except (config_lib.ConfigError, FileNotFoundError) as e:
    cli.fail(str(e))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
