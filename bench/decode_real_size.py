"""Real-size decoding (`python bench/decode.py --real_size=configs/deepseek_coder_1p3b.py [--layers=8]`): dsjax's
sampler against transformers `generate()` on the same random weights, at a preset's width, with the fraction of
the machine's memory roofline each reaches.

At real size, decoding is bound by reading the weights: a decode step reads every weight once (plus the KV cache),
so tokens/s <= batch x read bandwidth / bytes per step. The bandwidth is measured in the same run by a large JAX
reduction. Decode-only speed is the difference of two generate() calls, N new tokens and 1 (the same prefill), so
prompt processing does not blur it; end-to-end tokens/s (N new tokens / the whole call) is reported too.
transformers runs in a worker process (torch's and XLA's CPU threads contend in one process) that the main process
drives run by run, alternating with its own runs; the read bandwidth is measured between the runs of each batch
(this machine's varies by +-20% over minutes) and the best of those measurements is the roofline's. int8 / int4 rows
run dsjax alone (transformers has no CPU weight-only int4 path to compare with), with their own bytes per step.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import config as config_lib
from dsjax import quant
from dsjax.convert import hf
from dsjax.model import Transformer
from dsjax.model import layout
from dsjax.sample.sampler import Sampler, pad_prompts
from dsjax import checkpoint


def measure_read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
  """Bytes/s of a jitted sum over a `gib` GiB float32 array (best of `repeats`): what a decode step that reads
  the weights once could reach at most."""
  x = jnp.ones((int(gib * 2 ** 28),), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    total(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return x.nbytes / best


def random_params(model: Transformer, seed: int = 0, std: float = 0.02) -> Any:
  """Float32 params of the model's shape from numpy (norm scales 1 + N(0, 0.1)); no jax.random init compile."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                             jnp.arange(4, dtype=jnp.int32)[None])['params'])
  shapes = jax.tree.map(lambda x: x.value, shapes, is_leaf=lambda x: hasattr(x, 'value'))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape, np.float32))
    return jnp.asarray(rng.standard_normal(s.shape, np.float32) * std)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def step_bytes(params: Any, cfg: Any, batch: int, max_len: int) -> int:
  """Bytes a decode step reads: every weight except the token embedding (a gather of `batch` rows; the LM head
  reads it when tied) plus the whole KV cache (k and v of every layer, every slot)."""
  embedding = params['embedder']['embedding']
  weights = quant.weight_bytes(params) - (0 if cfg.tie_embeddings else embedding.size * embedding.dtype.itemsize)
  head_dim = config_lib.head_dim(cfg)
  cache = 2 * cfg.num_layers * batch * max_len * cfg.num_kv_heads * head_dim * jnp.dtype(cfg.dtype).itemsize
  return int(weights + cache)


class HFWorker:
  """transformers in a child process (`bench/decode.py --hf_serve=DIR`): one greedy generate() per request."""

  def __init__(self, script: str, hf_dir: str):
    env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE')  # idle torch threads must not spin while dsjax runs
    self.process = subprocess.Popen([sys.executable, script, f'--hf_serve={hf_dir}'], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=env)
    assert json.loads(self.process.stdout.readline())['ready']

  def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    self.process.stdin.write(json.dumps(dict(prompts=prompts, new_tokens=new_tokens)) + '\n')
    self.process.stdin.flush()
    reply = json.loads(self.process.stdout.readline())
    return reply['seconds'], reply['tokens']

  def close(self) -> None:
    self.process.stdin.close()
    self.process.wait(timeout=60)


def hf_serve(hf_dir: str) -> None:
  """The worker's loop: reads {"prompts", "new_tokens"} lines, answers {"seconds", "tokens"}."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  print(json.dumps(dict(ready=True)), flush=True)
  for line in sys.stdin:
    request = json.loads(line)
    ids = torch.tensor(request['prompts'])
    n = request['new_tokens']
    start = time.perf_counter()
    with torch.no_grad():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
    seconds = time.perf_counter() - start
    print(json.dumps(dict(seconds=seconds, tokens=out[:, ids.shape[1]:].tolist())), flush=True)


def log(message: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


def timed(fn) -> tuple[float, Any]:
  start = time.perf_counter()
  result = fn()
  return time.perf_counter() - start, result


def run(args, script: str, workdir: str) -> tuple[list[dict], dict]:
  """The real-size rows and the run's facts (bandwidth, model, layers)."""
  if os.path.isdir(args.real_size):  # an (imported) checkpoint
    cfg = checkpoint.load_config(args.real_size)
    cfg.model.dtype = cfg.model.param_dtype = 'float32'
    params = checkpoint.load_params(args.real_size, cfg.model)
    ckpt, weights = args.real_size, f'checkpoint {args.real_size}'
  else:
    cfg = config_lib.load_config(args.real_size)
    cfg.model.dtype = cfg.model.param_dtype = 'float32'
    if args.layers:
      cfg.model.num_layers = args.layers
    params = random_params(Transformer(cfg.model))
    ckpt = os.path.join(workdir, 'real_size')
    checkpoint.save_model(ckpt, cfg, params)
    weights = f'random N(0, 0.02), {os.path.basename(args.real_size)} shape, {cfg.model.num_layers} layers'
  model_cfg = cfg.model
  log(f'weights ready: {weights}')
  hf_dir = os.path.join(workdir, 'real_size_hf')
  hf.export_hf(ckpt, hf_dir, dtype='float32')
  log('exported for transformers')
  quantized = {}
  for mode in args.real_size_quant.split(',') if args.real_size_quant else []:
    quant_cfg = cfg.quant.copy_and_resolve_references()
    quant_cfg.mode, quant_cfg.group_size = mode, 128
    quantized[mode] = layout.for_decoding(quant.quantize_params(params, model_cfg, quant_cfg))
  num_params = sum(x.size for x in jax.tree.leaves(params))
  params = layout.for_decoding(params)  # once, at load: what users of the sampler and the engine get
  log('quantized and converted to the decoding layout')
  model = Transformer(model_cfg)
  rng = np.random.default_rng(1)
  all_prompts = rng.integers(1, model_cfg.vocab_size, (max(args.real_size_batches), args.real_size_prompt)).tolist()
  max_len = args.real_size_prompt + args.real_size_new
  n = args.real_size_new
  sampler = Sampler(model, max_len=max_len)
  worker = HFWorker(script, hf_dir)
  rows = []
  try:
    for batch in args.real_size_batches:
      prompts = all_prompts[:batch]
      tokens, lengths, _ = pad_prompts(prompts, n, max_len, 0)
      keys = jax.random.split(jax.random.key(0), batch)
      greedy = (jnp.zeros(batch), jnp.zeros(batch, jnp.int32), jnp.ones(batch), jnp.asarray([-1]), jnp.int32(0))

      def ours(p, new):
        """Greedy generation of `new` tokens per row in an n-token buffer: 1 and n tokens share one compile (the
        loop stops when every row has its tokens), as `Sampler.generate` compiles per max_new_tokens."""
        out = sampler._generate(p, tokens, lengths, keys, jnp.full(batch, new, jnp.int32), *greedy,  # pylint: disable=protected-access
                                max_new_tokens=n, vocab_limit=None, all_greedy=True)
        return np.asarray(out)[:, :new]
      log(f'batch {batch}: compiling')
      ours(params, n), ours(params, 1), worker.generate(prompts, n), worker.generate(prompts, 1)  # warm-up
      log(f'batch {batch}: timing')
      times = {key: [] for key in ('ours_n', 'ours_1', 'hf_n', 'hf_1')}
      bandwidths = []
      for _ in range(args.repeats):  # alternating: ours, theirs, ours, theirs; the bandwidth measured in between
        bandwidths.append(measure_read_bandwidth(repeats=3))
        seconds, our_tokens = timed(lambda: ours(params, n))
        times['ours_n'].append(seconds)
        seconds, hf_tokens = worker.generate(prompts, n)
        times['hf_n'].append(seconds)
        times['ours_1'].append(timed(lambda: ours(params, 1))[0])
        times['hf_1'].append(worker.generate(prompts, 1)[0])
      med = {key: statistics.median(value) for key, value in times.items()}
      bandwidth = max(bandwidths)  # the best read rate around these runs: the roofline errs high, never low
      step = (med['ours_n'] - med['ours_1']) / (n - 1)
      hf_step = (med['hf_n'] - med['hf_1']) / (n - 1)
      roofline = batch * bandwidth / step_bytes(params, model_cfg, batch, max_len)
      rows.append(dict(part='real_size', mode='float32', batch=batch, prompt_len=args.real_size_prompt,
                       new_tokens=n, dsjax_decode_tokens_per_s=batch / step, hf_decode_tokens_per_s=batch / hf_step,
                       decode_speedup=hf_step / step, dsjax_end_to_end_tokens_per_s=batch * n / med['ours_n'],
                       hf_end_to_end_tokens_per_s=batch * n / med['hf_n'],
                       bytes_per_step=step_bytes(params, model_cfg, batch, max_len),
                       read_bandwidth_gb_s=bandwidth / 1e9, roofline_tokens_per_s=roofline,
                       roofline_fraction=batch / step / roofline,
                       same_tokens=float((np.asarray(our_tokens) == np.asarray(hf_tokens)).mean())))
      for mode, qparams in (quantized.items() if batch in args.real_size_quant_batches else ()):
        log(f'batch {batch}: {mode}')
        ours(qparams, n), ours(qparams, 1)
        q_n = statistics.median(timed(lambda: ours(qparams, n))[0] for _ in range(args.repeats))
        q_1 = statistics.median(timed(lambda: ours(qparams, 1))[0] for _ in range(args.repeats))
        q_step = (q_n - q_1) / (n - 1)
        q_bytes = step_bytes(qparams, model_cfg, batch, max_len)
        rows.append(dict(part='real_size', mode=mode, batch=batch, prompt_len=args.real_size_prompt, new_tokens=n,
                         dsjax_decode_tokens_per_s=batch / q_step, dsjax_end_to_end_tokens_per_s=batch * n / q_n,
                         float_decode_ratio=step / q_step, bytes_per_step=q_bytes,
                         read_bandwidth_gb_s=bandwidth / 1e9,
                         roofline_tokens_per_s=batch * bandwidth / q_bytes,
                         roofline_fraction=batch / q_step / (batch * bandwidth / q_bytes)))
  finally:
    worker.close()
  facts = dict(real_size_weights=weights, real_size_params=int(num_params), num_layers=model_cfg.num_layers)
  return rows, facts


def print_rows(rows: list[dict], facts: dict) -> None:
  print(f'\nreal size: {facts["real_size_weights"]} ({facts["real_size_params"] / 1e9:.2f}B params); greedy, '
        f'decode-only tokens/s; roofline = batch x read GB/s (the best measured between the runs) / bytes per step')
  print(f'{"mode":>8} {"batch":>5} {"dsjax tok/s":>11} {"HF tok/s":>9} {"ratio":>6} {"GB/s":>5} {"roofline":>9} '
        f'{"of roofline":>11} {"e2e dsjax":>9} {"e2e HF":>7} {"same":>5}')
  for r in rows:
    if r['part'] != 'real_size':
      continue
    hf_rate = f'{r["hf_decode_tokens_per_s"]:9.2f}' if 'hf_decode_tokens_per_s' in r else f'{"":>9}'
    ratio = (f'{r["decode_speedup"]:5.2f}x' if 'decode_speedup' in r else f'{r["float_decode_ratio"]:5.2f}f')
    hf_e2e = f'{r["hf_end_to_end_tokens_per_s"]:7.2f}' if 'hf_end_to_end_tokens_per_s' in r else f'{"":>7}'
    same = f'{r["same_tokens"]:5.0%}' if 'same_tokens' in r else f'{"":>5}'
    print(f'{r["mode"]:>8} {r["batch"]:>5} {r["dsjax_decode_tokens_per_s"]:11.2f} {hf_rate} {ratio} '
          f'{r["read_bandwidth_gb_s"]:5.1f} '
          f'{r["roofline_tokens_per_s"]:9.2f} {r["roofline_fraction"]:11.0%} '
          f'{r["dsjax_end_to_end_tokens_per_s"]:9.2f} {hf_e2e} {same}')
  print('ratio: dsjax / transformers decode tokens/s (float rows); quantized rows: "f" = their speed / float32')
