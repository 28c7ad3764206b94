"""One command for a lent accelerator: the GPU test tier and the kernel benchmarks, each step under its own timeout,
JSON and a markdown summary written to --out.

  python bench/device_check.py --out=DIR [--only=tests,attention,sweep,decode,train] [--dry_run]

Installs nothing: run it where jax (with CUDA), flax, optax and the project's other dependencies import (on the
lent GPU machine, carry the wheels the image lacks, see docs/benchmarks.md). Steps, in order (about 8 minutes on one
H100/H200 in all; each is stopped at its timeout and the next one runs):

  tests      pytest -m gpu: compiled sparse / routed / decode kernels and cuDNN against the references (bf16,
             relative to max |ref|), the train step with the kernels on all local devices, kernel decoding
  attention  bench/attention.py: Pallas vs cuDNN vs XLA, TFLOP/s on unmasked work, causal and window 1024 up to
             32k tokens, routed k=N vs k=N/2
  sweep      bench/attention_sweep.py: block sizes x warps x stages of the Triton kernels
  decode     bench/decode_attention.py: GB/s of K+V read by the decode kernel against the device's copy rate
  train      bench/train.py --synthetic on the DeepSeek-Coder-1.3B preset: tokens/s and MFU

Each step writes DIR/<step>.log (its output) and, for benchmarks, DIR/<step>.json; DIR/summary.md and
DIR/summary.json collect the status, time and headline numbers of every step.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Step:
  name: str
  argv: tuple[str, ...]  # after the python executable; {out} is replaced by this step's JSON path
  timeout_s: int
  what: str


STEPS = (
    Step('tests', ('-m', 'pytest', '-m', 'gpu', 'tests/gpu', '-q', '-rs', '-n', '0', '-p', 'no:cacheprovider',
                   '--junitxml={out}.xml'), 110, 'GPU test tier (kernels and cuDNN vs references)'),
    Step('attention', ('bench/attention.py', '--shapes=8x16x2048,1x16x32768', '--windows=none,1024', '--calls=10',
                       '--repeats=3', '--out={out}'), 130, 'Pallas vs cuDNN vs XLA, routed k=N/2 vs k=N'),
    Step('sweep', ('bench/attention_sweep.py', '--shape=4x16x4096', '--windows=none,1024', '--blocks=64x64,128x64,'
                   '64x128,128x128', '--warps=4,8', '--stages=2,3', '--calls=5', '--repeats=3', '--decode=8x32x8x4096',
                   '--out={out}'), 120, 'Triton block / warps / stages sweep (flash and decode kernels)'),
    Step('decode', ('bench/decode_attention.py', '--steps=64', '--repeats=3', '--out={out}'), 40,
         'decode kernel GB/s vs copy rate'),
    Step('train', ('bench/train.py', '--config=configs/deepseek_coder_1p3b.py', '--synthetic', '--kinds=full',
                   '--steps=8', '--set=train.batch_size=8', '--set=data.seq_len=2048', '--set=model.remat=full',
                   '--out={out}'), 100, 'DeepSeek-Coder-1.3B train step, MFU'),
)


def run_step(step: Step, out_dir: str, dry_run: bool) -> dict:
  """Runs one step as a subprocess under its timeout; returns its status record."""
  json_path = os.path.join(out_dir, f'{step.name}.json')
  argv = [sys.executable] + [a.replace('{out}', json_path if step.name != 'tests' else
                                       os.path.join(out_dir, step.name)) for a in step.argv]
  record = dict(step=step.name, what=step.what, command=' '.join(argv[1:]), timeout_s=step.timeout_s)
  if dry_run:
    return dict(record, status='not run (dry run)', seconds=0.0)
  env = dict(os.environ)
  env.setdefault('JAX_PLATFORMS', '')  # tests/conftest.py pins CPU unless told otherwise
  env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [ROOT, env.get('PYTHONPATH', '')]))
  start = time.perf_counter()
  with open(os.path.join(out_dir, f'{step.name}.log'), 'w') as log:
    try:
      code = subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=step.timeout_s,
                            check=False).returncode
      status = 'ok' if code == 0 else f'failed (exit {code})'
    except subprocess.TimeoutExpired:
      status = f'timed out after {step.timeout_s} s'
  record.update(status=status, seconds=round(time.perf_counter() - start, 1))
  if os.path.exists(json_path):
    with open(json_path) as f:
      record['results'] = json.load(f)
  record['headline'] = headline(step.name, record.get('results'), os.path.join(out_dir, f'{step.name}.log'))
  return record


def _last_line(path: str, contains: str) -> str:
  if not os.path.exists(path):
    return ''
  with open(path) as f:
    lines = [line.strip() for line in f if contains in line]
  return lines[-1] if lines else ''


def headline(name: str, results: dict | None, log_path: str) -> str:
  """The numbers a reader wants from a step, in one line."""
  if name == 'tests':
    return _last_line(log_path, ' in ') or 'no pytest summary (see tests.log)'
  if not results:
    return 'no results (see the log)'
  rows = results.get('rows', [])
  if name == 'attention':
    parts = [f'{r["impl"]} / {r["vs"]} {r["shape"]} w={r["window"]}: fwd {r["fwd_ratio"]:.2f}, fwd+bwd '
             f'{r["fwd_bwd_ratio"]:.2f}' for r in results.get('ratios', [])
             if r['impl'] in ('pallas', 'routed k=N/2')]
    return '; '.join(parts) or 'no ratios (cuDNN missing?)'
  if name == 'sweep':
    return '; '.join(f'w={b["window"]} {b["pass_"]}: {b["block_q"]}x{b["block_k"]} warps {b["num_warps"]} stages '
                     f'{b["num_stages"]} {b["tflops"]:.0f} TFLOP/s ({b["speedup_vs_default"]:.2f}x default)'
                     for b in results.get('best', []))
  if name == 'decode':
    return '; '.join(f'{r["case"]}: {r["pallas_GBps"]:.0f} GB/s = {r["fraction_of_copy"]:.0%} of copy '
                     f'({r["copy_GBps"]:.0f} GB/s)' for r in rows)
  if name == 'train':
    return '; '.join(f'{r["kind"]} {r["batch"]}x{r["seq_len"]}: {r["tokens_per_sec"]:,.0f} tokens/s, MFU '
                     f'{r["mfu"]:.1%}' for r in rows)
  return ''


def write_summary(out_dir: str, records: list[dict]) -> str:
  devices = {r['results']['device'] for r in records if r.get('results', {}).get('device')}
  lines = [f'# device check {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}', '',
           f'device: {", ".join(sorted(devices)) or "unknown (no benchmark finished)"}', '',
           '| step | status | seconds | headline |', '|---|---|---|---|']
  for r in records:
    lines.append(f'| {r["step"]} | {r["status"]} | {r["seconds"]} | {r.get("headline", "")} |')
  text = '\n'.join(lines) + '\n'
  with open(os.path.join(out_dir, 'summary.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
    json.dump(records, f, indent=2)
  return text


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n', 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True, help='directory for the logs, JSON and summary.md')
  parser.add_argument('--only', default='', help='comma list of steps to run (default: all)')
  parser.add_argument('--dry_run', action='store_true', help='list the steps and their commands, run nothing')
  args = parser.parse_args()
  names = [s.name for s in STEPS]
  only = args.only.split(',') if args.only else names
  unknown = sorted(set(only) - set(names))
  if unknown:
    parser.error(f'--only: unknown step(s) {", ".join(unknown)}; the steps are {", ".join(names)}')
  os.makedirs(args.out, exist_ok=True)
  records = []
  for step in STEPS:
    if step.name in only:
      print(f'[device_check] {step.name}: {step.what} (timeout {step.timeout_s} s)', flush=True)
      records.append(run_step(step, args.out, args.dry_run))
      print(f'[device_check] {step.name}: {records[-1]["status"]} in {records[-1]["seconds"]} s', flush=True)
      write_summary(args.out, records)  # a summary even if a later step hangs the machine
  print(write_summary(args.out, records))
  sys.exit(0 if all(r['status'] in ('ok', 'not run (dry run)') for r in records) else 1)


if __name__ == '__main__':
  main()
