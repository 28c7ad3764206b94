"""Distilled draft models for speculative decoding: acceptance rate of a distilled draft against an undistilled draft
of the same size, as drafters for the same target.

  python bench/distill_draft.py [--target=DIR] [--target_steps=300] [--draft_steps=200] [--gamma=4]
                                [--out=bench/results/distill_draft.json]

Target: the checkpoint given (byte tokenizer), else configs/tiny.py trained `--target_steps` steps on the stdlib
corpus. Drafts: configs/tiny.py shrunk to `--draft_layers` layers of width `--draft_hidden`, trained through
dsjax.train.loop.train (the real pipeline) for `--draft_steps` steps with the same data, seed and schedule, once on
the labels only and once distilled from the target (distill.teacher = the target's checkpoint; temperature, weights
and top-k from the flags). Each draft then drafts for the target in dsjax.sample.speculative (ModelDrafter, greedy,
gamma tokens per round) on `--prompts` held-out stdlib prompts; outputs are checked equal to plain greedy decoding.
Reports, per draft and sampling temperature (`--temperatures`, default greedy and T = 1), the acceptance rate
(accepted / proposed drafts) and tokens per target forward; and per draft its held-out loss, KL to the target
(nats/token, T = 1) and teacher-forced greedy agreement with the target on the eval batches. A small, briefly trained
target decoding greedily soon loops (runs of spaces or underscores) that any draft predicts, so the greedy
acceptance rate saturates near 1 for both drafts; the T = 1 rows and the agreement show the difference
distillation makes. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.attention import write_results  # pylint: disable=g-import-not-at-top
from bench.decode import code_prompts  # pylint: disable=g-import-not-at-top
from dsjax import config as config_lib
from dsjax import distill
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.model import Transformer
from dsjax.sample import speculative
from dsjax.sample.sampler import Sampler
from dsjax import checkpoint
from dsjax.train import loop
from dsjax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_config(steps: int, workdir: str):
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  t = cfg.train
  t.steps, t.eval_every, t.num_samples, t.progress_bar = steps, steps, 0, False
  t.workdir, t.checkpoint_every, t.log_every = workdir, 0, max(steps // 4, 1)
  cfg.data.eval_batches = 2
  return cfg


def get_target(args, workdir: str) -> tuple[str, str]:
  """(checkpoint directory, how its weights were made)."""
  if args.target:
    return args.target, f'checkpoint {args.target}'
  cfg = base_config(args.target_steps, os.path.join(workdir, 'target'))
  config_lib.validate(cfg)
  summary = loop.train(cfg)
  bpb = summary['final_eval']['bits_per_byte']
  return summary['checkpoint'], f'configs/tiny.py trained {args.target_steps} steps ({bpb:.2f} held-out bits/byte)'


def draft_config(args, workdir: str, teacher: str):
  cfg = base_config(args.draft_steps, workdir)
  m = cfg.model
  m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.mlp_dim = (
      args.draft_layers, args.draft_hidden, max(args.draft_hidden // 32, 1), max(args.draft_hidden // 64, 1),
      args.draft_hidden * 11 // 4)
  d = cfg.distill
  d.teacher, d.temperature, d.kl_weight, d.hard_weight, d.top_k = (teacher, args.temperature, args.kl_weight,
                                                                    args.hard_weight, args.top_k)
  config_lib.validate(cfg)
  return cfg


def match_target(draft_cfg, draft_params, target_model, target_params, tokenizer) -> tuple[float, float]:
  """(mean KL(target || draft) per token at T = 1, fraction of tokens where draft and target argmax agree) over the
  eval batches, teacher-forced on held-out text: the agreement is greedy drafting's per-token acceptance on natural
  text, free of the repetition loops a small target falls into when it decodes greedily."""
  model = Transformer(draft_cfg.model)

  @jax.jit
  def sums(batch):
    logits, _ = model.apply({'params': draft_params}, batch['inputs'], batch['positions'],
                            segment_ids=batch['segment_ids'])
    teacher = distill.teacher_outputs(target_model, target_params, batch)
    mask = batch['segment_ids'] > 0
    agree = jnp.argmax(logits[..., :tokenizer.vocab_size], -1) == jnp.argmax(teacher[..., :tokenizer.vocab_size], -1)
    return (jnp.where(mask, distill.token_kl(logits, teacher, 1.0), 0.0).sum(), (agree & mask).sum(), mask.sum())

  totals = [sums(b) for b in pipeline.eval_batches(draft_cfg.data, tokenizer, draft_cfg.train.batch_size)]
  tokens = max(float(sum(t[2] for t in totals)), 1.0)
  return float(sum(t[0] for t in totals)) / tokens, float(sum(t[1] for t in totals)) / tokens


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--target', default='', help='a dsjax checkpoint directory (byte tokenizer)')
  parser.add_argument('--target_steps', type=int, default=300)
  parser.add_argument('--draft_steps', type=int, default=200)
  parser.add_argument('--draft_layers', type=int, default=1)
  parser.add_argument('--draft_hidden', type=int, default=128)
  parser.add_argument('--temperature', type=float, default=1.0, help='distill.temperature')
  parser.add_argument('--kl_weight', type=float, default=0.9)
  parser.add_argument('--hard_weight', type=float, default=0.1)
  parser.add_argument('--top_k', type=int, default=0)
  parser.add_argument('--gamma', type=int, default=4)
  parser.add_argument('--temperatures', default='0,1', help='sampling temperatures of the speculative runs (0: '
                      'greedy, checked against plain greedy decoding)')
  parser.add_argument('--prompts', type=int, default=8)
  parser.add_argument('--prompt_len', type=int, default=128)
  parser.add_argument('--new_tokens', type=int, default=64)
  parser.add_argument('--workdir', default='', help="where runs go ('' = a temporary directory under /tmp)")
  parser.add_argument('--out', default=os.path.join(ROOT, 'bench', 'results', 'distill_draft.json'))
  args = parser.parse_args()

  with tempfile.TemporaryDirectory(dir='/tmp') as tmp:
    workdir = args.workdir or tmp
    start = time.time()
    target_dir, target_desc = get_target(args, workdir)
    target_cfg = checkpoint.load_config(target_dir)
    target_model = Transformer(target_cfg.model)
    target_params = checkpoint.load_params(target_dir, target_cfg.model)
    tokenizer = tokenizer_lib.from_config(target_cfg.data)
    prompts = code_prompts(target_cfg, tokenizer, args.prompts, args.prompt_len)
    max_len = args.prompt_len + args.new_tokens
    target_sampler = Sampler(target_model, max_len=max_len, extra_slots=args.gamma + 1)
    settings = dict(max_new_tokens=args.new_tokens, pad_id=tokenizer.pad_id, vocab_limit=tokenizer.vocab_size)
    greedy = target_sampler.generate(target_params, prompts, jax.random.key(0), temperature=0.0, **settings)
    temperatures = [float(t) for t in args.temperatures.split(',')]

    rows = []
    for name, teacher in (('labels only', ''), ('distilled', target_dir)):
      cfg = draft_config(args, os.path.join(workdir, 'distilled' if teacher else 'labels'), teacher)
      run_start = time.time()
      summary = loop.train(cfg)
      train_s = time.time() - run_start
      draft_model = Transformer(cfg.model)
      drafter = speculative.ModelDrafter(Sampler(draft_model, max_len=max_len, extra_slots=args.gamma + 1),
                                         summary['params'])
      kl, agreement = match_target(cfg, summary['params'], target_model, target_params, tokenizer)
      for temperature in temperatures:
        out, stats = speculative.speculative_generate(target_sampler, target_params, drafter, prompts,
                                                      jax.random.key(0), gamma=args.gamma, temperature=temperature,
                                                      **settings)
        rows.append(dict(
            draft=name, temperature=temperature, layers=cfg.model.num_layers, hidden=cfg.model.hidden_size,
            params=summary['num_params'], steps=cfg.train.steps, train_seconds=train_s,
            held_out_loss=summary['final_eval']['loss'], kl_to_target=kl, greedy_agreement=agreement,
            acceptance_rate=stats['acceptance_rate'], tokens_per_target_step=stats['tokens_per_target_step'],
            same_as_greedy=out == greedy if temperature == 0 else None))

  print(f'target: {target_desc}; gamma={args.gamma}, temperatures {args.temperatures}, {len(prompts)} held-out '
        f'prompts of {args.prompt_len} '
        f'tokens, {args.new_tokens} new tokens; drafts {args.draft_steps} steps (distilled: T={args.temperature}, '
        f'kl_weight={args.kl_weight}, hard_weight={args.hard_weight}, top_k={args.top_k})')
  header = ('draft', 'temperature', 'params', 'held_out_loss', 'kl_to_target', 'greedy_agreement',
            'acceptance_rate', 'tokens_per_target_step', 'same_as_greedy')
  print(' | '.join(f'{h:>16}' for h in header))
  for row in rows:
    print(' | '.join(f'{row[h]:>16.4f}' if isinstance(row[h], float) else f'{str(row[h]):>16}' for h in header))
  gain = {}
  for temperature in temperatures:
    base, dist = (next(r for r in rows if r['draft'] == d and r['temperature'] == temperature)
                  for d in ('labels only', 'distilled'))
    gain[str(temperature)] = dist['acceptance_rate'] - base['acceptance_rate']
    print(f'temperature {temperature:g}: acceptance rate gained by distillation {gain[str(temperature)]:+.3f} '
          f'({base["acceptance_rate"]:.3f} -> {dist["acceptance_rate"]:.3f})')
  print(f'total {time.time() - start:.0f} s')
  write_results(args.out, rows, target=target_desc, gamma=args.gamma, prompts=len(prompts), temperatures=temperatures,
                prompt_len=args.prompt_len, new_tokens=args.new_tokens, draft_steps=args.draft_steps,
                distill=dict(temperature=args.temperature, kl_weight=args.kl_weight, hard_weight=args.hard_weight,
                             top_k=args.top_k), acceptance_gain=gain)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  np.set_printoptions(precision=4)
  main()
