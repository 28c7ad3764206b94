"""Weight-only quantization (dsjax/quant.py): weight memory, held-out loss and decode speed per mode.

  python bench/quant.py [--checkpoint=DIR] [--train_steps=200] [--group_size=64] [--new_tokens=32]
                        [--out=bench/results/quant.json]

Model: the checkpoint given, else configs/tiny.py trained `--train_steps` steps on the stdlib corpus (workdir in a
temporary directory). For each mode (none, int8, int4):
  (and int8 with int8 activations, 'int8+act8': dynamic per-token scales, int8 x int8 -> int32 matmuls)
  weight bytes of the params as served, and as a percentage of the same params all in bfloat16;
  held-out loss (nats/token) over `--eval_batches` fixed validation batches, and its increase over float;
  greedy decode tokens/s with dsjax.sample.sampler.Sampler at batch 1 and 8 (compile excluded, median of repeats).
Also the weight bytes of configs/deepseek_coder_1p3b.py, from abstract shapes only (jax.eval_shape, nothing
allocated). On CPU decode is compute-bound and the dequantization is an extra pass over each weight, so the timing
says nothing about the HBM-bound accelerator case, where reading half or a quarter of the bytes is the point.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.attention import write_results  # pylint: disable=g-import-not-at-top
from bench.decode import median_time
from dsjax import config as config_lib
from dsjax import quant
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.model import Transformer
from dsjax.sample.sampler import Sampler
from dsjax import checkpoint
from dsjax.train import loop
from dsjax.train import metrics as metrics_lib
from dsjax.train import objective as objective_lib
from dsjax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ('none', 'int8', 'int4')
ROWS = (('none', False), ('int8', False), ('int8', True), ('int4', False))  # (mode, int8 activations)
BATCHES = (1, 8)


def get_checkpoint(args: argparse.Namespace, workdir: str) -> tuple[str, str]:
  """(checkpoint directory, how its weights were made)."""
  if args.checkpoint:
    return args.checkpoint, f'checkpoint {args.checkpoint}'
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  t = cfg.train
  t.steps, t.eval_every, t.num_samples, t.progress_bar = args.train_steps, args.train_steps, 0, False
  t.workdir, t.checkpoint_every, t.log_every, t.tensorboard = os.path.join(workdir, 'train'), 0, 50, False
  cfg.data.eval_batches = 2
  config_lib.validate(cfg)
  summary = loop.train(cfg)
  return summary['checkpoint'], f'configs/tiny.py trained {args.train_steps} steps'


def big_model_bytes(group_size: int) -> dict[str, float]:
  """Weight bytes of DeepSeek-Coder 1.3B per mode as % of bf16, from abstract shapes."""
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'deepseek_coder_1p3b.py'))
  abstract = checkpoint.abstract_params(cfg.model)
  base = quant.weight_bytes(abstract, as_dtype='bfloat16')
  out = {'bf16_bytes': base}
  for mode in MODES[1:]:
    cfg.quant.mode, cfg.quant.group_size = mode, group_size
    q = jax.eval_shape(functools.partial(quant.quantize_params, model_cfg=cfg.model, quant_cfg=cfg.quant), abstract)
    out[f'{mode}_pct_of_bf16'] = 100 * quant.weight_bytes(q) / base
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', default='', help='a dsjax checkpoint directory')
  parser.add_argument('--train_steps', type=int, default=200)
  parser.add_argument('--group_size', type=int, default=64, help='int4 group (tiny: 704-wide MLP, 128 does not divide)')
  parser.add_argument('--eval_batches', type=int, default=8)
  parser.add_argument('--new_tokens', type=int, default=32)
  parser.add_argument('--prompt_len', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default=os.path.join(ROOT, 'bench', 'results', 'quant.json'))
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as workdir:
    ckpt, weights = get_checkpoint(args, workdir)
    cfg = checkpoint.load_config(ckpt)
    cfg.data.eval_batches = args.eval_batches
    params = checkpoint.load_params(ckpt, cfg.model)
  model = Transformer(cfg.model)
  tokenizer = tokenizer_lib.from_config(cfg.data)
  token_bytes = np.zeros((cfg.model.vocab_size,), np.int32)
  token_bytes[:tokenizer.vocab_size] = tokenizer.token_byte_lengths()
  batches = pipeline.eval_batches(cfg.data, tokenizer, cfg.train.batch_size)
  prompts = [b for b in np.asarray(batches[0]['inputs'])[:, :args.prompt_len].tolist()]
  base_bytes = quant.weight_bytes(params, as_dtype='bfloat16')

  rows = []
  for mode, activations in ROWS:
    cfg.quant.mode, cfg.quant.group_size, cfg.quant.activations = mode, args.group_size, activations
    qparams = quant.quantize_params(params, cfg.model, cfg.quant)
    qmodel = quant.quantize_model(model, cfg.quant)
    eval_step = jax.jit(objective_lib.make_eval_step(qmodel, jnp.asarray(token_bytes)))
    loss = metrics_lib.evaluate(eval_step, qparams, batches)['loss']
    row = dict(mode=mode + ('+act8' if activations else ''), weight_bytes=quant.weight_bytes(qparams),
               pct_of_bf16=100 * quant.weight_bytes(qparams) / base_bytes, heldout_loss=loss)
    for batch in BATCHES:
      sampler = Sampler(qmodel, max_len=args.prompt_len + args.new_tokens)
      run = lambda: sampler.generate(qparams, prompts[:batch], jax.random.key(0),  # pylint: disable=cell-var-from-loop
                                     max_new_tokens=args.new_tokens, temperature=0.0)
      row[f'tokens_per_s_b{batch}'] = batch * args.new_tokens / median_time(run, args.repeats)
    rows.append(row)
  for row in rows:
    row['loss_increase_pct'] = 100 * (row['heldout_loss'] / rows[0]['heldout_loss'] - 1)
  big = big_model_bytes(128)

  device = jax.devices()[0].device_kind
  print(f'\ndevice: {device}; weights: {weights}; compute dtype {cfg.model.dtype}; int4 group {args.group_size}')
  print(f'{"mode":>9} {"weight bytes":>13} {"% bf16":>7} {"held-out loss":>13} {"increase":>9} '
        f'{"tok/s b1":>9} {"tok/s b8":>9}')
  for r in rows:
    print(f'{r["mode"]:>9} {r["weight_bytes"]:13,d} {r["pct_of_bf16"]:6.1f}% {r["heldout_loss"]:13.4f} '
          f'{r["loss_increase_pct"]:8.3f}% {r["tokens_per_s_b1"]:9.1f} {r["tokens_per_s_b8"]:9.1f}')
  print(f'deepseek_coder_1p3b (abstract shapes, int4 group 128): int8 {big["int8_pct_of_bf16"]:.1f}% and int4 '
        f'{big["int4_pct_of_bf16"]:.1f}% of {big["bf16_bytes"] / 2**30:.2f} GiB bf16')
  print('note: CPU decode is compute-bound and pays an extra dequantization pass per weight; these tokens/s do not '
        'represent the HBM-bound GPU/TPU case.')
  settings = {k: v for k, v in vars(args).items() if k != 'out'}
  write_results(args.out, rows, weights=weights, deepseek_coder_1p3b=big, **settings)


if __name__ == '__main__':
  main()
