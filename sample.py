"""Sample completions from a dsjax checkpoint (e.g. one imported with dsjax.convert.hf):

  python sample.py --checkpoint=DIR --prompt='def fibonacci(n):' [--max_new_tokens=128 --temperature=0 --quant=int4
                          --adapter=LORA_DIR]

A thin CLI over dsjax.sample.sampler; the checkpoint's own config and tokenizer are used.
"""
import sys

from absl import app
from absl import flags
import jax

from dsjax import cli
from dsjax import config as config_lib

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'dsjax checkpoint directory.', required=True)
_PROMPT = flags.DEFINE_multi_string('prompt', ['def '], 'Prompt text; repeat the flag for several prompts.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 128, 'Tokens to generate per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0: greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, '0: no top-k filtering.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass in (0, 1]; 1: off.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_MODEL_FLAGS = cli.define_model_flags()

def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.quiet_logging()
  from dsjax.data import tokenizer as tokenizer_lib
  from dsjax.sample import text as text_lib
  try:
    cfg = cli.checkpoint_config(_CHECKPOINT.value, _MODEL_FLAGS)
    cfg.sample.update(dict(max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                           top_p=_TOP_P.value))
    config_lib.validate(cfg)
    model, params = cli.load_model(_CHECKPOINT.value, cfg, _MODEL_FLAGS)
    tokenizer = tokenizer_lib.from_config(cfg.data)
  except (config_lib.ConfigError, FileNotFoundError, ValueError) as e:
    cli.fail(str(e))
  try:
    completions = text_lib.complete(model, params, tokenizer, list(_PROMPT.value), jax.random.key(_SEED.value),
                                    cfg.sample)
  except ValueError as e:  # e.g. prompt + --max_new_tokens past the model's context
    cli.fail(str(e))
  for i, (prompt, text) in enumerate(zip(_PROMPT.value, completions)):
    if len(completions) > 1:  # one prompt: the completion alone, for pipes
      sys.stdout.write(f'--- sample {i + 1}/{len(completions)} ---\n')
    sys.stdout.write(f'{prompt}{text}\n')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
