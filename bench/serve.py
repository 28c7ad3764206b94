"""Serving load benchmark: N concurrent HTTP clients send M completion requests to an in-process serve.py app
(continuous-batching engine, random-weight model of configs/tiny.py's shape unless overridden) on this machine.

  python bench/serve.py [--clients=1,4,8] [--requests=32] [--num_slots=8] [--max_tokens=32]
                        [--prompt_len=8,64] [--out=bench/results/serve_cpu_DATE.json]

Each client sends its share of the M requests back to back (greedy, random prompt lengths in the range, a fixed
seed so runs are comparable). Per concurrency level: requests/s, p50/p99 request latency, completion tokens/s
(all clients together), mean decode batch occupancy. Every prompt bucket and the decode step are compiled before
timing. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import socket
import sys
import threading
import time
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.attention import write_results  # pylint: disable=g-import-not-at-top
from dsjax import config as config_lib
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.model import Transformer
from dsjax.sample import engine as engine_lib
from dsjax.serve import api as serve_api


def random_params(model: Transformer, seed: int = 0):
  """Random weights (N(0, 0.02), norm scales 1) without model.init's compile."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t, t), tokens)['params']
  rng = np.random.default_rng(seed)
  fill = lambda path, s: jnp.asarray(
      np.ones(s.shape) if jax.tree_util.keystr(path).endswith("['scale']") else rng.normal(0, 0.02, s.shape), s.dtype)
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes))


def post(url: str, body: dict) -> dict:
  request = urllib.request.Request(url, json.dumps(body).encode(), {'Content-Type': 'application/json'})
  with urllib.request.urlopen(request, timeout=600) as response:
    return json.loads(response.read())


def percentile(values: list[float], q: float) -> float:
  return float(np.percentile(np.asarray(values), q))


def run_level(url: str, engine: engine_lib.Engine, clients: int, requests: int, prompts: list[str],
              max_tokens: int) -> dict:
  """M requests over `clients` threads; returns the row of the table."""
  latencies, tokens = [], []
  lock = threading.Lock()
  queue = list(range(requests))

  def client():
    while True:
      with lock:
        if not queue:
          return
        i = queue.pop()
      start = time.perf_counter()
      body = post(url, dict(model='bench', prompt=prompts[i % len(prompts)], max_tokens=max_tokens, temperature=0))
      with lock:
        latencies.append(time.perf_counter() - start)
        tokens.append(body['usage']['completion_tokens'])

  steps0 = engine.steps
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    for future in [pool.submit(client) for _ in range(clients)]:
      future.result()
  wall = time.perf_counter() - start
  steps = engine.steps - steps0
  return dict(clients=clients, requests=requests, wall_s=wall, requests_per_s=requests / wall,
              latency_p50_s=percentile(latencies, 50), latency_p99_s=percentile(latencies, 99),
              tokens_per_s=sum(tokens) / wall, completion_tokens=sum(tokens), decode_steps=steps,
              mean_batch=sum(tokens) / max(steps, 1))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='configs/tiny.py', help='model shape (random weights)')
  p.add_argument('--clients', default='1,4,8', help='concurrency levels, comma-separated')
  p.add_argument('--requests', type=int, default=32, help='requests per level')
  p.add_argument('--num_slots', type=int, default=8)
  p.add_argument('--max_len', type=int, default=256)
  p.add_argument('--max_tokens', type=int, default=32)
  p.add_argument('--prompt_len', default='8,64', help='min,max prompt characters (byte tokenizer: tokens - 1)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default=f'bench/results/serve_{jax.default_backend()}_{datetime.date.today()}.json')
  args = p.parse_args()

  cfg = config_lib.load_config(args.config)
  model = Transformer(cfg.model)
  tokenizer = tokenizer_lib.load_tokenizer('byte')
  engine = engine_lib.Engine(model, random_params(model, args.seed), num_slots=args.num_slots, max_len=args.max_len,
                             max_queue=1024, vocab_limit=tokenizer.vocab_size)
  # Imported here: uvicorn is only needed for the HTTP part.
  import uvicorn  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(serve_api.create_app(engine, tokenizer, 'bench', max_len=args.max_len),
                                         host='127.0.0.1', port=port, log_level='warning'))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.05)
  url = f'http://127.0.0.1:{port}/v1/completions'

  rng = np.random.default_rng(args.seed)
  low, high = (int(v) for v in args.prompt_len.split(','))
  prompts = [''.join(chr(c) for c in rng.integers(97, 123, rng.integers(low, high + 1))) for _ in range(64)]
  compile_start = time.perf_counter()
  for n in sorted({engine_lib.bucket(len(pr) + 1, args.max_len) for pr in prompts}):
    post(url, dict(model='bench', prompt='a' * (n - 1), max_tokens=2, temperature=0))
  compile_s = time.perf_counter() - compile_start

  rows = [run_level(url, engine, int(c), args.requests, prompts, args.max_tokens) for c in args.clients.split(',')]
  server.should_exit = True
  thread.join(30)
  engine.shutdown(cancel=True)

  params_m = sum(x.size for x in jax.tree_util.tree_leaves(engine.params)) / 1e6
  print(f'{jax.devices()[0].device_kind}: {args.config} ({params_m:.1f}M params, random), {args.num_slots} slots, '
        f'max_len {args.max_len}, {args.max_tokens} new tokens, prompts {low}-{high} chars; '
        f'warm-up compiles {compile_s:.1f} s')
  print(f'{"clients":>7} {"reqs":>5} {"req/s":>7} {"p50 s":>7} {"p99 s":>7} {"tok/s":>8} {"batch":>6}')
  for r in rows:
    print(f'{r["clients"]:>7} {r["requests"]:>5} {r["requests_per_s"]:>7.2f} {r["latency_p50_s"]:>7.3f} '
          f'{r["latency_p99_s"]:>7.3f} {r["tokens_per_s"]:>8.1f} {r["mean_batch"]:>6.2f}')
  write_results(args.out, rows, config=args.config, params_millions=params_m, num_slots=args.num_slots,
                max_len=args.max_len, max_tokens=args.max_tokens, prompt_len=[low, high], compile_s=compile_s,
                backend=jax.default_backend(),
                latency='request sent to full response received')
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
