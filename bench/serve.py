"""Serving load benchmark: the fixed-slot engine (dsjax.sample.engine.Engine) and the paged engine
(dsjax.sample.paged_engine.PagedEngine) side by side in one run: the same random-weight model (configs/tiny.py's
shape unless overridden), the same KV memory, the same prompts, the same load.

  python bench/serve.py [--workloads=uniform,shared_prefix,long_short] [--clients=16] [--requests=32]
                        [--repeats=3] [--num_slots=8] [--max_len=512] [--block_size=16] [--prefill_budget=128]
                        [--max_tokens=32] [--burst=64] [--out=bench/results/serve_cpu_DATE.json]

Each engine (paged_engine.make_engine) gets its own in-process serve app over HTTP on 127.0.0.1; the paged pool
holds the KV memory of the --num_slots slots (kv_blocks=0: paged_engine.slot_equivalent_blocks). Workloads:
  uniform        prompts of 8-64 random characters;
  shared_prefix  prompts sharing one random --prefix_len-character prefix (a system prompt, a file) followed by a
                 distinct 8-32-character tail: the paged engine computes the shared blocks once (prefix cache);
  long_short     one prompt in 8 is long (max_len / 2 - 16 characters), the others short (8-64): chunked prefill
                 delays the running requests by at most --prefill_budget prompt tokens per step.
A pass: --clients threads send --requests requests back to back (stream=false, greedy, --max_tokens new tokens),
first to one engine, then the same prompts in the same order to the other. --repeats passes per workload, fresh
prompts (a fresh prefix) each, the engines taking turns going first; each row pools its passes (all requests over
all wall time; percentiles over all requests), the JSON keeps requests/s per pass (on a shared machine their spread
is the noise). Per (workload, engine): requests/s; time to first token, read engine-side as
Request.first_token_at - submitted_at (queueing + prefill + the step that draws it; no HTTP), p50 and p99, for
long_short also of the short requests alone; request latency, client-side (request sent to full response received),
p50 and p99; completion tokens/s; engine steps and new tokens per step; for the paged engine the prefix-cache hit
rate (prompt tokens found cached / prompt tokens admitted) and preemptions.
Burst (how many requests run at once on a fixed KV budget): --burst requests of 8-32 characters and --burst_tokens
new tokens submitted at once (engine.submit, no HTTP) while a thread samples stats()['active'] every 5 ms: peak and
mean running requests (the slot engine is capped at --num_slots, the paged one by blocks and --max_running).
Before timing, a warm-up compiles every shape (prompt buckets and prefill chunk widths 8..max_len one request at a
time, then --max_running requests at once ending one per step: decode rows 1..max_running) with prompts unrelated
to the timed ones, so the prefix cache starts cold for them; XLA compiles during the timed passes are counted
(should be 0). The greedy outputs of the two engines are compared prompt by prompt. Prints tables, writes JSON.
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
from dsjax.sample import paged_engine
from dsjax.serve import api as serve_api

ENGINES = ('slots', 'paged')
WORKLOADS = ('uniform', 'shared_prefix', 'long_short')
SHORT = (8, 64)  # characters of a short prompt

_compiles = [0]


def _count_compiles(event: str, duration: float, **kwargs) -> None:
  del duration, kwargs
  if event == '/jax/core/compile/backend_compile_duration':
    _compiles[0] += 1


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


def percentile(values: list[float], q: float) -> float | None:
  return float(np.percentile(np.asarray(values), q)) if values else None


def letters(rng: np.random.Generator, n: int) -> str:
  return ''.join(chr(c) for c in rng.integers(97, 123, n))


def short_prompts(rng: np.random.Generator, n: int, low: int, high: int) -> list[str]:
  return [letters(rng, int(rng.integers(low, high + 1))) for _ in range(n)]


def workload_prompts(name: str, rng: np.random.Generator, args: argparse.Namespace) -> list[str]:
  if name == 'uniform':
    return short_prompts(rng, args.requests, *SHORT)
  if name == 'shared_prefix':
    prefix = letters(rng, args.prefix_len)
    return [prefix + tail for tail in short_prompts(rng, args.requests, 8, 32)]
  if name == 'long_short':
    long_len = args.max_len // 2 - 16
    return [letters(rng, long_len) if i % 8 == 0 else p
            for i, p in enumerate(short_prompts(rng, args.requests, *SHORT))]
  raise ValueError(f'unknown workload {name!r}; choose from {WORKLOADS}')


class Served:
  """An engine behind its own in-process serve app; records the engine.Request of every submission."""

  def __init__(self, kind: str, engine: engine_lib.Engine, tokenizer, max_len: int):
    import uvicorn  # pylint: disable=g-import-not-at-top  (only the HTTP part needs it)
    self.kind, self.engine, self.recorded = kind, engine, []
    submit = engine.submit

    def recording_submit(*a, **kw):
      request = submit(*a, **kw)
      self.recorded.append(request)
      return request

    engine.submit = recording_submit  # the app calls engine.submit: every request it makes lands in `recorded`
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    self.server = uvicorn.Server(uvicorn.Config(serve_api.create_app(engine, tokenizer, 'bench', max_len=max_len),
                                                host='127.0.0.1', port=port, log_level='warning'))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    while not self.server.started:
      time.sleep(0.05)
    self.url = f'http://127.0.0.1:{port}/v1/completions'

  def close(self) -> None:
    self.server.should_exit = True
    self.thread.join(30)
    self.engine.shutdown(cancel=True)


def warm_up(served: Served, encode, rng: np.random.Generator, max_len: int, max_running: int) -> float:
  """Compiles every shape the timed passes use (see the module docstring); returns seconds."""
  start = time.perf_counter()
  size = engine_lib.MIN_BUCKET
  while size <= max_len:  # one request alone per prompt bucket / chunk width (random text: no prefix hits)
    tokens = 5 if size == engine_lib.MIN_BUCKET else size // 2 + 1
    post(served.url, dict(model='bench', prompt=letters(rng, tokens - 1), max_tokens=2, temperature=0))
    size *= 2
  engine = served.engine  # then max_running at once, finishing one per step: every decode row bucket
  requests = [engine.submit(encode(p), max_new_tokens=2 + i)
              for i, p in enumerate(short_prompts(rng, max_running, 8, 16))]
  for request in requests:
    request.result()
  return time.perf_counter() - start


def run_pass(served: Served, prompts: list[str], clients: int, max_tokens: int) -> dict:
  """One timed pass: the prompts over `clients` HTTP threads, in order. Returns raw measurements."""
  engine, n = served.engine, len(prompts)
  latencies, tokens = [0.0] * n, [0] * n
  lock = threading.Lock()
  todo = list(range(n))

  def client():
    while True:
      with lock:
        if not todo:
          return
        i = todo.pop(0)
      start = time.perf_counter()
      body = post(served.url, dict(model='bench', prompt=prompts[i], max_tokens=max_tokens, temperature=0))
      latencies[i], tokens[i] = time.perf_counter() - start, body['usage']['completion_tokens']

  served.recorded.clear()
  before, compiles = engine.stats(), _compiles[0]
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    for future in [pool.submit(client) for _ in range(clients)]:
      future.result()
  wall = time.perf_counter() - start
  after = engine.stats()
  recorded = [r for r in served.recorded if r.first_token_at is not None]
  return dict(wall=wall, requests=n, latencies=latencies, tokens=sum(tokens), compiles=_compiles[0] - compiles,
              ttft=[r.first_token_at - r.submitted_at for r in recorded],
              ttft_short=[r.first_token_at - r.submitted_at for r in recorded if len(r.prompt_ids) <= SHORT[1] + 1],
              stats={k: after[k] - before[k] for k in after},
              outputs={tuple(r.prompt_ids): tuple(r.tokens) for r in served.recorded})


def workload_row(workload: str, kind: str, clients: int, passes: list[dict]) -> dict:
  """The table row of one (workload, engine): every pass pooled (requests, wall time, percentiles over all)."""
  pooled = lambda key: [v for p in passes for v in p[key]]
  total = lambda key: sum(p['stats'].get(key, 0) for p in passes)
  requests, wall, tokens = (sum(p[key] for p in passes) for key in ('requests', 'wall', 'tokens'))
  paged = kind == 'paged'
  return dict(workload=workload, engine=kind, clients=clients, passes=len(passes), requests=requests, wall_s=wall,
              requests_per_s=requests / wall, requests_per_s_per_pass=[p['requests'] / p['wall'] for p in passes],
              ttft_p50_s=percentile(pooled('ttft'), 50), ttft_p99_s=percentile(pooled('ttft'), 99),
              ttft_short_p50_s=percentile(pooled('ttft_short'), 50) if workload == 'long_short' else None,
              ttft_short_p99_s=percentile(pooled('ttft_short'), 99) if workload == 'long_short' else None,
              latency_p50_s=percentile(pooled('latencies'), 50), latency_p99_s=percentile(pooled('latencies'), 99),
              completion_tokens=tokens, tokens_per_s=tokens / wall, steps=total('steps'),
              tokens_per_step=total('generated_tokens') / max(total('steps'), 1),
              prefix_hit_rate=total('prefix_hit_tokens') / max(total('prefix_queried_tokens'), 1) if paged else None,
              preemptions=total('preemptions') if paged else None, compiles=sum(p['compiles'] for p in passes))


def run_burst(served: Served, prompts: list[list[int]], new_tokens: int) -> dict:
  """All prompts submitted at once; stats()['active'] sampled every 5 ms until all are done. Raw measurements."""
  engine = served.engine
  samples, done = [], threading.Event()

  def sample():
    while not done.is_set():
      samples.append(engine.stats()['active'])
      time.sleep(0.005)

  sampler = threading.Thread(target=sample, daemon=True)
  before, compiles = engine.stats(), _compiles[0]
  start = time.perf_counter()
  sampler.start()
  requests = [engine.submit(p, max_new_tokens=new_tokens) for p in prompts]
  for request in requests:
    request.result()
  wall = time.perf_counter() - start
  done.set()
  sampler.join()
  after = engine.stats()
  return dict(wall=wall, requests=len(prompts), samples=samples, compiles=_compiles[0] - compiles,
              stats={k: after[k] - before[k] for k in after})


def burst_row(served: Served, new_tokens: int, passes: list[dict]) -> dict:
  engine, paged = served.engine, served.kind == 'paged'
  samples = [v for p in passes for v in p['samples']]
  requests, wall = sum(p['requests'] for p in passes), sum(p['wall'] for p in passes)
  total = lambda key: sum(p['stats'].get(key, 0) for p in passes)
  return dict(engine=served.kind, passes=len(passes), requests=requests, new_tokens=new_tokens,
              kv_tokens=engine.num_blocks * engine.block_size if paged else engine.num_slots * engine.max_len,
              peak_active=max(samples), peak_active_per_pass=[max(p['samples']) for p in passes],
              mean_active=float(np.mean(samples)), wall_s=wall, requests_per_s=requests / wall,
              requests_per_s_per_pass=[p['requests'] / p['wall'] for p in passes],
              tokens_per_s=total('generated_tokens') / wall, steps=total('steps'),
              preemptions=total('preemptions') if paged else None, compiles=sum(p['compiles'] for p in passes))


def fmt(value, spec: str, missing: str = '-') -> str:
  return missing if value is None else format(value, spec)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='configs/tiny.py', help='model shape (random weights)')
  p.add_argument('--workloads', default=','.join(WORKLOADS), help='comma-separated, from ' + ', '.join(WORKLOADS))
  p.add_argument('--clients', type=int, default=16, help='concurrent HTTP clients (both engines)')
  p.add_argument('--requests', type=int, default=32, help='requests per workload')
  p.add_argument('--num_slots', type=int, default=8, help='slot engine rows; the KV memory of both engines')
  p.add_argument('--max_len', type=int, default=512)
  p.add_argument('--block_size', type=int, default=16)
  p.add_argument('--max_running', type=int, default=64, help='paged: requests running at once at most')
  p.add_argument('--prefill_budget', type=int, default=128, help='paged: prompt tokens per step')
  p.add_argument('--max_tokens', type=int, default=32, help='new tokens per request')
  p.add_argument('--prefix_len', type=int, default=320, help='shared_prefix: characters of the shared prefix')
  p.add_argument('--burst', type=int, default=64, help='burst requests submitted at once (0: skip)')
  p.add_argument('--burst_tokens', type=int, default=24, help='burst: new tokens per request')
  p.add_argument('--repeats', type=int, default=3, help='timed passes per workload and engine (fresh prompts each)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default=f'bench/results/serve_{jax.default_backend()}_{datetime.date.today()}.json')
  args = p.parse_args()
  workloads = [w for w in args.workloads.split(',') if w]
  for w in workloads:
    if w not in WORKLOADS:
      p.error(f'unknown workload {w!r}; choose from {", ".join(WORKLOADS)}')

  jax.monitoring.register_event_duration_secs_listener(_count_compiles)
  cfg = config_lib.load_config(args.config)
  model = Transformer(cfg.model)
  params = random_params(model, args.seed)
  tokenizer = tokenizer_lib.load_tokenizer('byte')
  served = {}
  for kind in ENGINES:
    engine = paged_engine.make_engine(kind, model, params, num_slots=args.num_slots, max_len=args.max_len,
                                      block_size=args.block_size, max_running=args.max_running,
                                      prefill_budget=args.prefill_budget, max_queue=1024,
                                      vocab_limit=tokenizer.vocab_size)
    served[kind] = Served(kind, engine, tokenizer, args.max_len)
  encode = lambda text: [tokenizer.bos_id] + tokenizer.encode(text).tolist()  # as the app encodes a prompt
  # Warm-up prompts come from their own generator: nothing the timed passes send is cached by them.
  compile_s = {kind: warm_up(s, encode, np.random.default_rng(args.seed + 1000), args.max_len, args.max_running)
               for kind, s in served.items()}

  rng = np.random.default_rng(args.seed)
  rows, outputs_equal = [], {}
  for workload in workloads:
    passes, equal = {kind: [] for kind in ENGINES}, []
    for i in range(args.repeats):  # fresh prompts each pass; the engines take turns going first
      prompts = workload_prompts(workload, rng, args)
      for kind in ENGINES[::1 if i % 2 == 0 else -1]:
        passes[kind].append(run_pass(served[kind], prompts, args.clients, args.max_tokens))
      a, b = (passes[kind][-1].pop('outputs') for kind in ENGINES)
      equal += [a.get(k) == v for k, v in b.items()]
    outputs_equal[workload] = sum(equal) / max(len(equal), 1)
    rows += [workload_row(workload, kind, args.clients, passes[kind]) for kind in ENGINES]
  burst_rows = []
  if args.burst:
    passes = {kind: [] for kind in ENGINES}
    for i in range(args.repeats):
      prompts = [encode(t) for t in short_prompts(rng, args.burst, 8, 32)]
      for kind in ENGINES[::1 if i % 2 == 0 else -1]:
        passes[kind].append(run_burst(served[kind], prompts, args.burst_tokens))
    burst_rows = [burst_row(served[kind], args.burst_tokens, passes[kind]) for kind in ENGINES]
  for s in served.values():
    s.close()

  paged = served['paged'].engine
  params_m = sum(x.size for x in jax.tree_util.tree_leaves(served['slots'].engine.params)) / 1e6
  print(f'{jax.devices()[0].device_kind}: {args.config} ({params_m:.1f}M params, random), KV memory '
        f'{args.num_slots} slots x {args.max_len} = {paged.num_blocks} blocks x {paged.block_size} tokens; paged: '
        f'max_running {args.max_running}, prefill_budget {args.prefill_budget}; {args.clients} clients, '
        f'{args.repeats} x {args.requests} requests per workload, {args.max_tokens} new tokens, greedy; warm-up '
        + ', '.join(f'{k} {v:.1f} s' for k, v in compile_s.items()))
  print('ttft: engine-side, submit -> first token; latency: client-side, HTTP request -> full response')
  print(f'{"workload":<14}{"engine":<7}{"req/s":>7}{"ttft p50":>9}{"ttft p99":>9}{"short p99":>10}{"lat p50":>8}'
        f'{"lat p99":>8}{"tok/s":>8}{"steps":>6}{"tok/step":>9}{"prefix hit":>11}{"preempt":>8}{"compiles":>9}')
  for r in rows:
    print(f'{r["workload"]:<14}{r["engine"]:<7}{r["requests_per_s"]:>7.2f}{r["ttft_p50_s"]:>9.3f}'
          f'{r["ttft_p99_s"]:>9.3f}{fmt(r["ttft_short_p99_s"], ".3f"):>10}{r["latency_p50_s"]:>8.3f}'
          f'{r["latency_p99_s"]:>8.3f}{r["tokens_per_s"]:>8.1f}{r["steps"]:>6}{r["tokens_per_step"]:>9.2f}'
          f'{fmt(r["prefix_hit_rate"], ".1%"):>11}{fmt(r["preemptions"], "d"):>8}{r["compiles"]:>9}')
  ratios = {}
  for w, s, p in zip(workloads, rows[0::2], rows[1::2]):
    per_pass = [b / a for a, b in zip(s['requests_per_s_per_pass'], p['requests_per_s_per_pass'])]
    ratios[w] = dict(requests_per_s=p['requests_per_s'] / s['requests_per_s'], requests_per_s_per_pass=per_pass,
                     ttft_p50=p['ttft_p50_s'] / s['ttft_p50_s'], ttft_p99=p['ttft_p99_s'] / s['ttft_p99_s'])
    print(f'paged / slots, {w}: req/s x{ratios[w]["requests_per_s"]:.2f} (passes x{min(per_pass):.2f}-'
          f'x{max(per_pass):.2f}), ttft p50 x{ratios[w]["ttft_p50"]:.2f}, p99 x{ratios[w]["ttft_p99"]:.2f}; '
          f'greedy outputs equal for {outputs_equal[w]:.0%} of prompts')
  if burst_rows:
    print(f'burst: {args.burst} requests of 8-32 characters, {args.burst_tokens} new tokens, submitted at once '
          f'({args.repeats} passes pooled)')
    print(f'{"engine":<7}{"KV tokens":>10}{"peak running":>13}{"mean running":>13}{"wall s":>8}{"req/s":>7}'
          f'{"tok/s":>8}{"steps":>6}{"preempt":>8}{"compiles":>9}')
    for r in burst_rows:
      print(f'{r["engine"]:<7}{r["kv_tokens"]:>10}{r["peak_active"]:>13}{r["mean_active"]:>13.1f}{r["wall_s"]:>8.2f}'
            f'{r["requests_per_s"]:>7.2f}{r["tokens_per_s"]:>8.1f}{r["steps"]:>6}{fmt(r["preemptions"], "d"):>8}'
            f'{r["compiles"]:>9}')
  write_results(args.out, rows, burst=burst_rows, ratios=ratios, outputs_equal=outputs_equal, config=args.config,
                params_millions=params_m, num_slots=args.num_slots, max_len=args.max_len,
                kv_blocks=paged.num_blocks, block_size=paged.block_size, max_running=args.max_running,
                prefill_budget=args.prefill_budget, clients=args.clients, max_tokens=args.max_tokens,
                prefix_len=args.prefix_len, burst_requests=args.burst, burst_tokens=args.burst_tokens,
                repeats=args.repeats, requests=args.requests, compile_s=compile_s, backend=jax.default_backend(),
                cpu_count=os.cpu_count(),
                ttft='engine-side: Request.first_token_at - submitted_at',
                latency='client-side: HTTP request sent to full response received')
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
