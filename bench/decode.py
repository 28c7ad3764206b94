"""CPU decoding benchmark: dsjax's jitted sampler against `transformers` generate() on the same weights, and
speculative decoding against plain greedy on code-completion prompts.

  python bench/decode.py [--checkpoint=DIR] [--train_steps=150] [--skip_train] [--new_tokens=64] [--gammas=2,4]
                         [--draft=DRAFT_CHECKPOINT] [--out=bench/results/decode_cpu_<date>.json]

Model: the checkpoint given, else configs/tiny.py trained `--train_steps` steps on the stdlib corpus (a trained
model matters for speculative acceptance), else (--skip_train) random weights. The weights go through
dsjax.convert.hf.export_hf into a float32 LlamaForCausalLM.
  (a) greedy tokens/s at batch 1 and 8, same prompts (held-out stdlib code, equal lengths) and new-token count;
      compile time excluded by a warm-up call; median of --repeats. transformers runs in a subprocess that never
      runs JAX (in a process where XLA has run, torch's CPU threads contend with XLA's).
  (b) greedy speculative decoding (prompt-lookup drafter, and a draft model with --draft) against plain greedy,
      batch 1, one prompt at a time, the whole speculative loop on device: speedup, acceptance rate, tokens per
      target step (outputs checked identical).
Prints a table and writes JSON (device name and date included).

Real size (`--real_size=configs/deepseek_coder_1p3b.py [--layers=8]`, or an imported checkpoint directory): the
preset's shape with random weights against transformers on the same weights, batch 1/4/8, decode-only tokens/s and
the fraction of the memory roofline (bench/decode_real_size.py), plus int8/int4 (`--real_size_quant`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import decode_real_size  # pylint: disable=g-import-not-at-top
from bench.attention import write_results  # pylint: disable=g-import-not-at-top
from dsjax import config as config_lib
from dsjax.convert import hf
from dsjax.data import corpus
from dsjax.data import mixture
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.model import Transformer
from dsjax.model import layout
from dsjax.sample import speculative
from dsjax.sample.sampler import Sampler
from dsjax import checkpoint
from dsjax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCHES = (1, 8)


def get_checkpoint(args, workdir: str) -> tuple[str, str]:
  """(checkpoint directory, how its weights were made)."""
  if args.checkpoint:
    return args.checkpoint, f'checkpoint {args.checkpoint}'
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  if args.skip_train:
    model = Transformer(cfg.model)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), jnp.arange(8, dtype=jnp.int32)[None])
    directory = os.path.join(workdir, 'random')
    checkpoint.save_model(directory, cfg, params['params'])
    return directory, 'random init (configs/tiny.py)'
  t = cfg.train
  t.steps, t.eval_every, t.num_samples, t.progress_bar = args.train_steps, args.train_steps, 0, False
  t.workdir, t.checkpoint_every, t.log_every = os.path.join(workdir, 'train'), 0, 50
  cfg.data.eval_batches = 2
  config_lib.validate(cfg)
  summary = loop.train(cfg)
  bpb = summary['final_eval']['bits_per_byte']
  return summary['checkpoint'], f'configs/tiny.py trained {args.train_steps} steps ({bpb:.2f} held-out bits/byte)'


def code_prompts(cfg, tokenizer, count: int, length: int) -> list[list[int]]:
  """`count` prompts of exactly `length` tokens: BOS + the bytes before a line start midway through held-out
  stdlib files."""
  docs = mixture.load_split(cfg.data, 'validation')
  prompts = []
  for doc in docs:
    ids = tokenizer.encode(doc.text)
    if len(ids) < 4 * length:
      continue
    cut = int(np.flatnonzero(ids[len(ids) // 2:] == ord('\n'))[0]) + len(ids) // 2 + 1
    prompts.append([tokenizer.bos_id] + ids[cut - length + 1:cut].tolist())
    if len(prompts) == count:
      break
  return prompts


def median_time(fn, repeats: int) -> float:
  fn()  # warm-up: compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def hf_worker(hf_dir: str, prompts_file: str, new_tokens: int, repeats: int, pad_id: int) -> None:
  """Prints JSON {batch: seconds} of transformers greedy generate(): run in its own process, because after JAX has
  run in a process, torch's CPU threads contend with XLA's (batch-1 generate measured ~10x slower)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  with open(prompts_file) as f:
    prompts = json.load(f)
  seconds, outputs = {}, {}
  for batch in BATCHES:
    ids = torch.tensor(prompts[:batch])

    def generate():
      with torch.no_grad():
        return hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=None)

    seconds[batch] = median_time(generate, repeats)
    outputs[batch] = generate()[:, ids.shape[1]:].tolist()
  print(json.dumps(dict(seconds=seconds, outputs=outputs)))


def bench_vs_transformers(model, params, hf_dir: str, prompts: list[list[int]], new_tokens: int, repeats: int,
                          pad_id: int, workdir: str) -> list[dict]:
  prompts_file = os.path.join(workdir, 'prompts.json')
  with open(prompts_file, 'w') as f:
    json.dump(prompts[:max(BATCHES)], f)
  worker = subprocess.run([sys.executable, os.path.abspath(__file__), f'--hf_worker={hf_dir}',
                           f'--hf_prompts={prompts_file}', f'--new_tokens={new_tokens}', f'--repeats={repeats}',
                           f'--pad_id={pad_id}'], check=True, capture_output=True, text=True)
  hf_result = json.loads(worker.stdout.strip().splitlines()[-1])
  rows = []
  for batch in BATCHES:
    batch_prompts = prompts[:batch]
    sampler = Sampler(model, max_len=len(batch_prompts[0]) + new_tokens)
    ours = lambda: sampler.generate(params, batch_prompts, jax.random.key(0), max_new_tokens=new_tokens,
                                    temperature=0.0, pad_id=pad_id)
    ours_s, theirs_s = median_time(ours, repeats), hf_result['seconds'][str(batch)]
    same = (np.asarray(ours()) == np.asarray(hf_result['outputs'][str(batch)])).mean()
    rows.append(dict(part='a', batch=batch, prompt_len=len(batch_prompts[0]), new_tokens=new_tokens,
                     dsjax_tokens_per_s=batch * new_tokens / ours_s, hf_tokens_per_s=batch * new_tokens / theirs_s,
                     speedup=theirs_s / ours_s, same_tokens=float(same)))
  return rows


def bench_speculative(model, params, prompts: list[list[int]], new_tokens: int, gammas: list[int], pad_id: int,
                      vocab_limit: int, draft: str = '', repeats: int = 3) -> list[dict]:
  max_len = len(prompts[0]) + new_tokens
  sampler = Sampler(model, max_len=max_len, extra_slots=max(gammas) + 1)
  plain = lambda p: sampler.generate(params, [p], jax.random.key(0), max_new_tokens=new_tokens, temperature=0.0,
                                     pad_id=pad_id, vocab_limit=vocab_limit)
  rows = []
  drafters = [(f'prompt lookup (n<=3), gamma={g}', speculative.PromptLookupDrafter(3, 1), g) for g in gammas]
  if draft:
    drafters += [(f'draft model, gamma={g}', speculative.make_drafter(draft, model.cfg, max_len=max_len, gamma=g), g)
                 for g in gammas]
  for name, drafter, gamma in drafters:
    spec = lambda p: speculative.speculative_generate(sampler, params, drafter, [p], jax.random.key(0),
                                                      max_new_tokens=new_tokens, gamma=gamma, pad_id=pad_id,
                                                      vocab_limit=vocab_limit)
    plain(prompts[0]), spec(prompts[0])  # compile
    plain_s = spec_s = 0.0
    accepted = proposed = generated = row_steps = 0
    same = True
    for p in prompts:  # per prompt: the median of `repeats` runs of each, alternating
      times = {'plain': [], 'spec': []}
      for _ in range(repeats):
        for which, fn in (('plain', plain), ('spec', spec)):
          start = time.perf_counter()
          result = fn(p)
          times[which].append(time.perf_counter() - start)
          if which == 'plain':
            reference = result
          else:
            out, stats = result
      plain_s += statistics.median(times['plain'])
      spec_s += statistics.median(times['spec'])
      same &= out == reference
      accepted, proposed = accepted + stats['accepted'], proposed + stats['proposed']
      generated, row_steps = generated + stats['generated_tokens'], row_steps + stats['row_steps']
    rows.append(dict(part='b', drafter=name, prompts=len(prompts), prompt_len=len(prompts[0]), new_tokens=new_tokens,
                     plain_tokens_per_s=generated / plain_s, spec_tokens_per_s=generated / spec_s,
                     speedup=plain_s / spec_s, acceptance_rate=accepted / proposed,
                     tokens_per_target_step=generated / row_steps, same_as_greedy=bool(same)))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', default='', help='a dsjax checkpoint directory (byte tokenizer)')
  parser.add_argument('--train_steps', type=int, default=150)
  parser.add_argument('--skip_train', action='store_true', help='random weights instead of training')
  parser.add_argument('--new_tokens', type=int, default=64)
  parser.add_argument('--prompt_len', type=int, default=128)
  parser.add_argument('--spec_prompts', type=int, default=8)
  parser.add_argument('--spec_new_tokens', type=int, default=96)
  parser.add_argument('--spec_prompt_len', type=int, default=384)
  parser.add_argument('--gammas', default='2,4', help='draft lengths to try')
  parser.add_argument('--draft', default='', help='a draft model checkpoint (same tokenizer) to speculate with too')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default=os.path.join(
      ROOT, 'bench', 'results', f'decode_cpu_{datetime.date.today().isoformat()}.json'))
  parser.add_argument('--real_size', default='', help='a preset config (random weights) or a checkpoint directory: '
                      'the real-size comparison only (see bench/decode_real_size.py)')
  parser.add_argument('--layers', type=int, default=8, help='real size: layers of the preset (0: all of them)')
  parser.add_argument('--real_size_batches', default='1,4,8')
  parser.add_argument('--real_size_prompt', type=int, default=16)
  parser.add_argument('--real_size_new', type=int, default=16)
  parser.add_argument('--real_size_quant', default='int8,int4', help='quantized modes to time too ("" for none)')
  parser.add_argument('--real_size_quant_batches', default='1', help='the batches to time them at')
  parser.add_argument('--hf_serve', default='', help=argparse.SUPPRESS)
  parser.add_argument('--hf_worker', default='', help=argparse.SUPPRESS)
  parser.add_argument('--hf_prompts', default='', help=argparse.SUPPRESS)
  parser.add_argument('--pad_id', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.hf_worker:
    hf_worker(args.hf_worker, args.hf_prompts, args.new_tokens, args.repeats, args.pad_id)
    return
  if args.hf_serve:
    decode_real_size.hf_serve(args.hf_serve)
    return
  settings = {k: v for k, v in vars(args).items() if k not in ('out', 'hf_worker', 'hf_prompts', 'pad_id', 'hf_serve')}
  if args.real_size:
    args.real_size_batches = [int(b) for b in str(args.real_size_batches).split(',')]
    args.real_size_quant_batches = [int(b) for b in str(args.real_size_quant_batches).split(',') if b]
    with tempfile.TemporaryDirectory() as workdir:
      rows, facts = decode_real_size.run(args, os.path.abspath(__file__), workdir)
    print(f'\ndevice: {jax.devices()[0].device_kind}')
    decode_real_size.print_rows(rows, facts)
    out = args.out.replace('decode_cpu_', 'decode_real_size_cpu_')
    write_results(out, rows, **facts, **settings)
    return

  with tempfile.TemporaryDirectory() as workdir:
    ckpt, weights = get_checkpoint(args, workdir)
    cfg = checkpoint.load_config(ckpt)
    params = layout.for_decoding(checkpoint.load_params(ckpt, cfg.model))  # once, as users loading for inference
    model = Transformer(cfg.model)
    tokenizer = tokenizer_lib.load_tokenizer('byte')
    hf_dir = os.path.join(workdir, 'hf')
    hf.export_hf(ckpt, hf_dir, dtype='float32')
    prompts = code_prompts(cfg, tokenizer, max(8, args.spec_prompts), args.spec_prompt_len)
    rows = bench_vs_transformers(model, params, hf_dir, [p[-args.prompt_len:] for p in prompts], args.new_tokens,
                                 args.repeats, tokenizer.pad_id, workdir)
    rows += bench_speculative(model, params, prompts[:args.spec_prompts], args.spec_new_tokens,
                              [int(g) for g in args.gammas.split(',')],
                              tokenizer.pad_id, tokenizer.vocab_size, args.draft, args.repeats)

  print(f'\ndevice: {jax.devices()[0].device_kind}; weights: {weights}; greedy, float32')
  print(f'{"batch":>5} {"prompt":>6} {"new":>4} {"dsjax tok/s":>12} {"HF tok/s":>10} {"speedup":>8} {"same":>6}')
  for r in rows:
    if r['part'] == 'a':
      print(f'{r["batch"]:>5} {r["prompt_len"]:>6} {r["new_tokens"]:>4} {r["dsjax_tokens_per_s"]:12.1f} '
            f'{r["hf_tokens_per_s"]:10.1f} {r["speedup"]:7.2f}x {r["same_tokens"]:6.1%}')
  print(f'\n{"drafter":>30} {"plain tok/s":>11} {"spec tok/s":>10} {"speedup":>8} {"accept":>7} {"tok/step":>8} '
        f'{"exact":>6}')
  for r in rows:
    if r['part'] == 'b':
      print(f'{r["drafter"]:>30} {r["plain_tokens_per_s"]:11.1f} {r["spec_tokens_per_s"]:10.1f} '
            f'{r["speedup"]:7.2f}x {r["acceptance_rate"]:7.1%} {r["tokens_per_target_step"]:8.2f} '
            f'{str(r["same_as_greedy"]):>6}')
  write_results(args.out, rows, weights=weights, **settings)


if __name__ == '__main__':
  main()
