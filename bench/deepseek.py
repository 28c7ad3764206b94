"""DeepSeek-V2/V3 layers, each against its baseline side by side in one run: the dropless MoE's grouped matmul vs
dense dispatch, latent attention (MLA) vs multi-head attention (MHA) decoding, and multi-token prediction (MTP) as a
speculative drafter.

  python bench/deepseek.py [--parts=moe,mla,mtp] [--small] [--out=bench/results/deepseek_cpu_<date>.json]

(1) moe: `dsjax.model.moe.routed_experts` (the N*k (token, expert) pairs sorted by expert, three
    `jax.lax.ragged_dot` grouped matmuls) against dense dispatch (every expert on every token: einsums over all E
    experts, then the [N, E] routing weights, zero outside each token's k experts, select and weight), jitted,
    forward and forward+backward (gradients of x, the routing weights and the three expert weights), median ms and
    the ratio; both are asserted to give the same output and the same gradients. Shapes `--moe_shapes`
    (D x F x E x k x N): DeepSeek-V2-Lite's routed experts (D 2048, F 1408, E 64, k 6) with D halved and F
    quartered for a CPU, at 512 and 2048 tokens, and configs/tiny_moe.py's (D 256, F 176, E 8, k 2) at a train
    step's 2048 tokens. Softmax scores from a random router, greedy top-k (V2-Lite). Each row also lists the FLOPs
    XLA compiled (its cost analysis): a true grouped matmul does k/E of dense dispatch's expert FLOPs, but XLA:CPU
    lowers ragged_dot densely (every row against every group's weight, masked), i.e. E x the grouped FLOPs. A row
    whose compiled temporaries exceed `--max_temp_gb` is skipped and says so.
(2) mla: two models of equal hidden size, heads and layers (random N(0, 0.02) float32 weights, byte vocabulary,
    full causal attention): MHA (key and value heads = heads, head_dim 64) and MLA (kv_lora_rank 256, qk_rope 32,
    qk_nope 64, v 64, no query compression: DeepSeek-V2-Lite's shape halved). Decode-cache bytes per token over all
    layers and at a `--cache_context` context (abstract shapes: `jax.eval_shape` of the cache, nothing allocated),
    parameter counts, attention multiply-adds per cached token, and greedy decode tokens/s at each batch x
    context: one random prompt is prefilled with `Sampler.prefill` and its cache repeated over the batch's rows (a
    step's cost does not depend on the tokens), then a jitted loop of the Sampler's own decode step (argmax, then
    the cached forward of that token) runs N and 1 steps; decode-only time = (t(N) - t(1)) / (N - 1), the two
    models alternating, median of `--mla_repeats`. The loop's tokens are checked against `Sampler.generate`.
(3) mtp: a configs/tiny_moe.py checkpoint (`--mtp_checkpoint`; default /tmp/w/run_mtp/checkpoint when it exists,
    else trained `--train_steps` steps in a temporary directory), held-out stdlib prompts (bench/decode.py's
    `code_prompts`), batch 1, greedy: plain decoding vs `speculative_generate` with the model's own MTP depth
    (`make_drafter('mtp', ...)`, gamma `--gammas`) and the prompt-lookup drafter (`--lookup_gammas`): acceptance
    rate, tokens per target step, wall time and speedup (per prompt the median of `--mtp_repeats` alternating
    runs). The speculative outputs are asserted identical to plain greedy.
Prints a table per part and writes JSON (device name and date included). `--parts` runs a subset; its rows replace
that part's rows in an existing `--out` file and the other parts' are kept. The defaults take about 13 minutes on 2
idle CPU cores (moe ~3, mla ~5, mtp ~5); `--small` shrinks every size (a smoke test of two or three minutes when
given a checkpoint, else plus a 20-step training).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.attention import write_results  # pylint: disable=g-import-not-at-top
from bench.decode import code_prompts
from bench.decode_real_size import random_params
from dsjax import checkpoint
from dsjax import config as config_lib
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.model import Transformer
from dsjax.model import cache as cache_lib
from dsjax.model import layout
from dsjax.model import moe
from dsjax.sample import speculative
from dsjax.sample.sampler import Sampler
from dsjax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ('moe', 'mla', 'mtp')
DEFAULT_MTP_CHECKPOINT = '/tmp/w/run_mtp/checkpoint'
SMALL = dict(moe_shapes='256x176x8x2x256,256x128x16x4x512', hidden=256, heads=4, layers=2, mlp_dim=512,
             kv_lora_rank=64, qk_rope=16, qk_nope=32, v_head=32, contexts='64,128', decode_steps=8,
             mtp_prompts=2, mtp_new_tokens=32, mtp_prompt_len=128, train_steps=20, mtp_repeats=1, moe_repeats=1,
             mla_repeats=1)


def log(message: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


# ---------------------------------------------------------------- (1) MoE: grouped matmul vs dense dispatch


def dense_dispatch(x_ND: jax.Array, idx_NK: jax.Array, w_NK: jax.Array, gate_EDF: jax.Array, up_EDF: jax.Array,
                   down_EFD: jax.Array) -> jax.Array:
  """The baseline: every expert applied to every token, then the routing weights select. sum_e W_ne SwiGLU_e(x_n),
  float32 [N, D], with W [N, E] holding each token's k routing weights and zeros elsewhere (the weight scales the
  hidden activations before the down projection, which then contracts experts and F in one matmul)."""
  f32 = jnp.float32
  weights_NE = jnp.einsum('NK,NKE->NE', w_NK.astype(f32), jax.nn.one_hot(idx_NK, gate_EDF.shape[0], dtype=f32))
  gate_NEF = jnp.einsum('ND,EDF->NEF', x_ND, gate_EDF)
  up_NEF = jnp.einsum('ND,EDF->NEF', x_ND, up_EDF)
  h_NEF = nn.silu(gate_NEF) * up_NEF * weights_NE[..., None].astype(x_ND.dtype)
  return jnp.einsum('NEF,EFD->ND', h_NEF, down_EFD, preferred_element_type=f32)


def moe_inputs(d: int, f: int, e: int, k: int, n: int, seed: int = 0) -> tuple[jax.Array, ...]:
  """(x [N, D], expert indices [N, k], routing weights [N, k], gate/up [E, D, F], down [E, F, D], cotangent [N, D]):
  unit-variance tokens, softmax scores of a random router with greedy top-k (DeepSeek-V2-Lite's routing), expert
  weights scaled so every activation is O(1)."""
  keys = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(keys[0], (n, d), jnp.float32)
  router = jax.random.normal(keys[1], (d, e), jnp.float32) * d ** -0.5
  idx, w = moe.route(moe.expert_scores(x @ router, 'softmax'), k)
  gate = jax.random.normal(keys[2], (e, d, f), jnp.float32) * d ** -0.5
  up = jax.random.normal(keys[3], (e, d, f), jnp.float32) * d ** -0.5
  down = jax.random.normal(keys[4], (e, f, d), jnp.float32) * f ** -0.5
  cotangent = jax.random.normal(keys[5], (n, d), jnp.float32)
  return x, idx, w, gate, up, down, cotangent


def moe_passes(fn: Callable[..., jax.Array]) -> dict[str, Callable[..., Any]]:
  """{'fwd': y(inputs), 'fwd_bwd': gradients of <y, cotangent> w.r.t. x, the routing weights and the three expert
  weights}, neither jitted."""
  def fwd(x, idx, w, gate, up, down, cotangent):
    del cotangent
    return fn(x, idx, w, gate, up, down)

  def fwd_bwd(x, idx, w, gate, up, down, cotangent):
    loss = lambda x, w, gate, up, down: jnp.vdot(fn(x, idx, w, gate, up, down), cotangent)
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, w, gate, up, down)
  return {'fwd': fwd, 'fwd_bwd': fwd_bwd}


def assert_close(got: Any, want: Any, what: str, rtol: float = 2e-4) -> float:
  """AssertionError unless every leaf of `got` is within rtol x max|want| of `want`; returns the largest such
  relative error."""
  worst = 0.0
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    err = float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30))
    worst = max(worst, err)
    assert err <= rtol, f'{what}: grouped and dense dispatch differ by {err:.2e} of max |dense| (> {rtol})'
  return worst


def bench_moe(shapes: list[tuple[int, ...]], repeats: int, max_temp_gb: float) -> list[dict]:
  rows = []
  impls = {'grouped': moe.routed_experts, 'dense': dense_dispatch}
  for d, f, e, k, n in shapes:
    inputs = moe_inputs(d, f, e, k, n)
    load = np.bincount(np.asarray(inputs[1]).reshape(-1), minlength=e)
    row = dict(part='moe', shape=f'D{d} F{f} E{e} k{k} N{n}', hidden=d, expert_dim=f, experts=e, top_k=k, tokens=n,
               max_over_mean_load=float(load.max() / load.mean()),
               useful_gflop_fwd=2 * 3 * n * k * d * f / 1e9, dense_gflop_fwd=2 * 3 * n * e * d * f / 1e9)
    for pass_name in ('fwd', 'fwd_bwd'):
      compiled, outputs = {}, {}
      for impl, fn in impls.items():
        compiled[impl] = jax.jit(moe_passes(fn)[pass_name]).lower(*inputs).compile()
        temp_gb = compiled[impl].memory_analysis().temp_size_in_bytes / 1e9
        cost = compiled[impl].cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        row[f'{impl}_{pass_name}_compiled_gflop'] = float(cost.get('flops', float('nan'))) / 1e9
        row[f'{impl}_{pass_name}_temp_gb'] = temp_gb
        if temp_gb > max_temp_gb:
          row[f'{impl}_{pass_name}_skipped'] = f'needs {temp_gb:.1f} GB of temporaries (> --max_temp_gb)'
          log(f'moe {row["shape"]} {impl} {pass_name}: skipped, {temp_gb:.1f} GB of temporaries')
          del compiled[impl]
          continue
        outputs[impl] = jax.block_until_ready(compiled[impl](*inputs))  # also the warm-up call
      log(f'moe {row["shape"]} {pass_name}: timing {sorted(compiled)}')
      times = {impl: [] for impl in compiled}
      for _ in range(repeats):  # alternating, so drifting load on a shared machine hits both alike
        for impl, fn in compiled.items():
          start = time.perf_counter()
          jax.block_until_ready(fn(*inputs))
          times[impl].append(time.perf_counter() - start)
      for impl, seconds in times.items():
        row[f'{impl}_{pass_name}_ms'] = 1e3 * statistics.median(seconds)
      if len(outputs) == 2:
        row[f'{pass_name}_max_rel_err'] = assert_close(outputs['grouped'], outputs['dense'],
                                                       f'{row["shape"]} {pass_name}')
        row[f'{pass_name}_dense_over_grouped'] = row[f'dense_{pass_name}_ms'] / row[f'grouped_{pass_name}_ms']
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def print_moe(rows: list[dict]) -> None:
  print(f'\n(1) MoE routed experts, float32: grouped = moe.routed_experts (ragged_dot), dense = every expert on every '
        f'token; ms are medians; "x" = dense ms / grouped ms (> 1: grouped faster); GFLOP as XLA compiled them')
  print(f'{"shape":>26} {"pass":>7} {"grouped ms":>10} {"dense ms":>9} {"x":>6} {"grouped GFLOP":>13} '
        f'{"dense GFLOP":>11} {"useful":>7} {"max err":>8}')
  for r in rows:
    for p in ('fwd', 'fwd_bwd'):
      ms = {impl: f'{r[f"{impl}_{p}_ms"]:.1f}' if f'{impl}_{p}_ms' in r else 'skipped' for impl in ('grouped', 'dense')}
      ratio = f'{r[f"{p}_dense_over_grouped"]:.2f}x' if f'{p}_dense_over_grouped' in r else '-'
      err = f'{r[f"{p}_max_rel_err"]:.1e}' if f'{p}_max_rel_err' in r else '-'
      useful = r['useful_gflop_fwd'] * (3 if p == 'fwd_bwd' else 1)
      print(f'{r["shape"]:>26} {p:>7} {ms["grouped"]:>10} {ms["dense"]:>9} {ratio:>6} '
            f'{r[f"grouped_{p}_compiled_gflop"]:13.1f} {r[f"dense_{p}_compiled_gflop"]:11.1f} {useful:7.1f} '
            f'{err:>8}')
  print('useful: the GFLOP of the N*k routed pairs alone (forward x3 for forward+backward), what a true grouped '
        'matmul does; dense dispatch does E/k times that.')


# ---------------------------------------------------------------- (2) MLA vs MHA decoding


def attention_configs(args: argparse.Namespace) -> dict[str, Any]:
  """{'MHA': model config, 'MLA': model config}: equal hidden size, heads, layers, MLP and vocabulary."""
  base = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  m = base.model
  m.hidden_size, m.num_heads, m.num_kv_heads, m.num_layers = args.hidden, args.heads, args.heads, args.layers
  m.head_dim, m.mlp_dim, m.dtype, m.param_dtype = args.head_dim, args.mlp_dim, 'float32', 'float32'
  m.attention.kind = 'full'
  m.max_positions = max(args.cache_context, max(args.contexts) + args.decode_steps)
  out = {}
  for name in ('MHA', 'MLA'):
    cfg = base.copy_and_resolve_references()
    if name == 'MLA':
      la = cfg.model.mla
      la.kv_lora_rank, la.q_lora_rank, la.qk_rope_head_dim = args.kv_lora_rank, 0, args.qk_rope
      la.qk_nope_head_dim, la.v_head_dim = args.qk_nope, args.v_head
    config_lib.validate(cfg)
    out[name] = cfg.model
  return out


def cache_bytes(model_cfg: Any, context: int, batch: int = 1) -> int:
  """Bytes of the decode cache's k and v arrays (every layer) for `batch` rows of `context` tokens, from abstract
  shapes (positions and segment ids, 8 bytes per token whatever the attention, not counted)."""
  shapes = jax.eval_shape(lambda: cache_lib.init_cache(model_cfg, batch, context))
  return sum(x.size * x.dtype.itemsize for name in ('k', 'v') for x in shapes[name])


def attention_macs(model_cfg: Any) -> int:
  """Multiply-adds a decode step's attention does per cached token and layer: heads x (2 x head_dim) for MHA (scores
  against the key, mix of the value); heads x (2 x kv_lora_rank + qk_rope) for MLA's absorbed form (scores against
  the latent and the RoPE key, mix of the latent), W_uk / W_uv being applied once per query, not per cached token."""
  la = model_cfg.mla
  if la.kv_lora_rank:
    return model_cfg.num_heads * (2 * la.kv_lora_rank + la.qk_rope_head_dim)
  return model_cfg.num_heads * 2 * config_lib.head_dim(model_cfg)


def param_count(model: Transformer) -> tuple[int, int]:
  """(all parameters, attention parameters) of `model`, from abstract shapes."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                             jnp.arange(4, dtype=jnp.int32)[None])['params'])
  total = attention = 0
  for path, x in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    size = math.prod(x.shape)
    total += size
    attention += size if "['attention']" in jax.tree_util.keystr(path) else 0
  return total, attention


def decode_loop(sampler: Sampler, max_steps: int):
  """jit(params, cache, last logits [B, V], positions [B], steps) -> the greedy tokens [B, max_steps] (the first
  `steps` written): `steps` of the Sampler's decode step (argmax, then the cached forward of that token), as in
  `Sampler.generate`'s loop. `steps` is traced, so 1 and N steps share one compile."""
  forward = sampler._forward  # pylint: disable=protected-access

  def run(params, cache, last_BV, pos_B, steps):
    batch = last_BV.shape[0]

    def body(i, state):
      cache, last_BV, pos_B, out = state
      next_B = jnp.argmax(last_BV, axis=-1).astype(jnp.int32)
      logits, cache = forward(params, cache, next_B[:, None], pos_B[:, None], jnp.ones((batch, 1), jnp.int32))
      return cache, logits[:, 0], pos_B + 1, out.at[:, i].set(next_B)
    out = jnp.zeros((batch, max_steps), jnp.int32)
    return jax.lax.fori_loop(0, steps, body, (cache, last_BV, pos_B, out))[-1]
  return jax.jit(run)


def prefill_row(sampler: Sampler, params: Any, prompt: list[int], batch: int) -> tuple[Any, jax.Array]:
  """(cache, last logits [batch, V]) of `prompt` prefilled once and repeated over `batch` rows: a decode step's cost
  does not depend on the tokens (every cache slot is read and masked), and one row's prefill is a `batch`-th of the
  time (and of the attention scores held at once) of a batched one."""
  last, cache = jax.jit(sampler.prefill)(params, sampler.init_cache(1), jnp.asarray([prompt], jnp.int32),
                                         jnp.asarray([len(prompt)], jnp.int32))
  repeat = lambda x: jnp.repeat(x, batch, axis=0)
  return jax.block_until_ready(jax.tree.map(repeat, cache)), repeat(last)


def first_rows(prefilled: tuple[Any, jax.Array], batch: int) -> tuple[Any, jax.Array]:
  """The first `batch` rows of a prefilled (cache, last logits)."""
  return jax.tree.map(lambda x: x[:batch], prefilled)


def bench_mla(args: argparse.Namespace) -> tuple[list[dict], dict]:
  cfgs = attention_configs(args)
  models = {name: Transformer(cfg) for name, cfg in cfgs.items()}
  facts = {}
  for name, cfg in cfgs.items():
    total, attention = param_count(models[name])
    per_token = cache_bytes(cfg, 1)
    (k_shape, v_shape) = cache_lib.cache_token_shape(cfg)
    facts[name] = dict(params=total, attention_params=attention, cache_bytes_per_token=per_token,
                       cache_numbers_per_token_layer=math.prod(k_shape) + math.prod(v_shape),
                       cache_bytes_at_context=cache_bytes(cfg, args.cache_context), cache_context=args.cache_context,
                       attention_macs_per_cached_token_layer=attention_macs(cfg),
                       hidden=cfg.hidden_size, heads=cfg.num_heads, layers=cfg.num_layers, mlp_dim=cfg.mlp_dim,
                       head_dim=config_lib.head_dim(cfg), kv_heads=cfg.num_kv_heads,
                       mla=dict(cfg.mla) if name == 'MLA' else None)
  log(f'models: {json.dumps(facts)}')
  params = {name: layout.for_decoding(random_params(model, seed=0)) for name, model in models.items()}
  rng = np.random.default_rng(1)
  rows = []
  n = args.decode_steps
  for context in args.contexts:
    max_len = context + n
    samplers = {name: Sampler(model, max_len=max_len) for name, model in models.items()}
    loops = {name: decode_loop(sampler, n) for name, sampler in samplers.items()}
    prompt = rng.integers(1, cfgs['MHA'].vocab_size, (context,)).tolist()
    prefilled = {}
    for name, sampler in samplers.items():
      log(f'mla part: {name} prefill of {context} tokens')
      prefilled[name] = prefill_row(sampler, params[name], prompt, max(args.batches))
    if context == min(args.contexts):  # the loop is the Sampler's decoding: same tokens as generate()
      for name, sampler in samplers.items():
        ours = np.asarray(loops[name](params[name], *first_rows(prefilled[name], 1),
                                      jnp.asarray([context], jnp.int32), 4))[:, :4]
        theirs = sampler.generate(params[name], [prompt], jax.random.key(0), max_new_tokens=4, temperature=0.0)
        assert ours.tolist() == theirs, f'{name}: the decode loop {ours.tolist()} != Sampler.generate {theirs}'
    for batch in args.batches:
      state = {name: (params[name], *first_rows(prefilled[name], batch), jnp.full((batch,), context, jnp.int32))
               for name in samplers}

      def run(name, steps, state=state):
        return jax.block_until_ready(loops[name](*state[name], steps))
      log(f'mla part: context {context}, batch {batch}: compiling')
      for name in samplers:
        run(name, n)  # 1 and n steps share this compile
      times = {(name, steps): [] for name in samplers for steps in (n, 1)}
      for _ in range(args.mla_repeats):  # alternating: MHA N, MHA 1, MLA N, MLA 1
        for name in samplers:
          for steps in (n, 1):
            start = time.perf_counter()
            run(name, steps)
            times[name, steps].append(time.perf_counter() - start)
      row = dict(part='mla', context=context, batch=batch, decode_steps=n)
      for name in samplers:
        step = (statistics.median(times[name, n]) - statistics.median(times[name, 1])) / (n - 1)
        row[f'{name.lower()}_ms_per_step'] = 1e3 * step
        row[f'{name.lower()}_tokens_per_s'] = batch / step
        row[f'{name.lower()}_cache_bytes'] = cache_bytes(cfgs[name], max_len, batch)
      row['mla_over_mha_speed'] = row['mla_tokens_per_s'] / row['mha_tokens_per_s']
      rows.append(row)
      print(json.dumps(row), flush=True)
    del prefilled
  return rows, facts


def print_mla(rows: list[dict], facts: dict) -> None:
  mha, mla = facts['MHA'], facts['MLA']
  la = mla['mla']
  print(f'\n(2) MLA vs MHA decoding: hidden {mha["hidden"]}, {mha["heads"]} heads, {mha["layers"]} layers, MLP '
        f'{mha["mlp_dim"]}, float32, random weights. MHA: {mha["kv_heads"]} key/value heads of {mha["head_dim"]}; '
        f'MLA: kv_lora_rank {la["kv_lora_rank"]}, qk_rope {la["qk_rope_head_dim"]}, qk_nope {la["qk_nope_head_dim"]}, '
        f'v {la["v_head_dim"]}, no query compression')
  print(f'{"":>4} {"params":>12} {"attention params":>16} {"cache numbers/token/layer":>25} {"cache bytes/token":>17} '
        f'{"cache at " + str(mha["cache_context"]):>14}')
  for name, f in facts.items():
    print(f'{name:>4} {f["params"]:12,d} {f["attention_params"]:16,d} {f["cache_numbers_per_token_layer"]:25,d} '
          f'{f["cache_bytes_per_token"]:17,d} {f["cache_bytes_at_context"] / 2**20:11.1f} MiB')
  print(f'MHA / MLA cache: {mha["cache_bytes_per_token"] / mla["cache_bytes_per_token"]:.2f}x; attention multiply-adds '
        f'per cached token and layer: MHA {mha["attention_macs_per_cached_token_layer"]:,d}, MLA (absorbed) '
        f'{mla["attention_macs_per_cached_token_layer"]:,d}')
  print(f'\n{"context":>7} {"batch":>5} {"MHA tok/s":>9} {"MLA tok/s":>9} {"MLA/MHA":>7} {"MHA ms/step":>11} '
        f'{"MLA ms/step":>11} {"MHA cache":>10} {"MLA cache":>10}')
  for r in rows:
    print(f'{r["context"]:>7} {r["batch"]:>5} {r["mha_tokens_per_s"]:9.1f} {r["mla_tokens_per_s"]:9.1f} '
          f'{r["mla_over_mha_speed"]:6.2f}x {r["mha_ms_per_step"]:11.2f} {r["mla_ms_per_step"]:11.2f} '
          f'{r["mha_cache_bytes"] / 2**20:6.1f} MiB {r["mla_cache_bytes"] / 2**20:6.1f} MiB')


# ---------------------------------------------------------------- (3) MTP as a speculative drafter


def mtp_checkpoint(args: argparse.Namespace, workdir: str) -> tuple[str, str]:
  """(checkpoint directory, how its weights were made)."""
  if args.mtp_checkpoint:
    return args.mtp_checkpoint, f'checkpoint {args.mtp_checkpoint}'
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny_moe.py'))
  t = cfg.train
  t.steps, t.eval_every, t.num_samples, t.progress_bar = args.train_steps, args.train_steps, 0, False
  t.workdir, t.checkpoint_every, t.log_every, t.tensorboard = os.path.join(workdir, 'train'), 0, 50, False
  cfg.data.eval_batches = 2
  config_lib.validate(cfg)
  summary = loop.train(cfg)
  bpb = summary['final_eval']['bits_per_byte']
  return summary['checkpoint'], f'configs/tiny_moe.py trained {args.train_steps} steps ({bpb:.2f} held-out bits/byte)'


def bench_mtp(args: argparse.Namespace) -> tuple[list[dict], dict]:
  with tempfile.TemporaryDirectory() as workdir:
    ckpt, weights = mtp_checkpoint(args, workdir)
    cfg = checkpoint.load_config(ckpt)
    params = layout.for_decoding(checkpoint.load_params(ckpt, cfg.model))
  log(f'mtp part: {weights}')
  model = Transformer(cfg.model)
  tokenizer = tokenizer_lib.load_tokenizer('byte')
  prompts = code_prompts(cfg, tokenizer, args.mtp_prompts, args.mtp_prompt_len)
  new = args.mtp_new_tokens
  max_len = args.mtp_prompt_len + new
  gammas = args.gammas + args.lookup_gammas
  sampler = Sampler(model, max_len=max_len, extra_slots=max(gammas) + 1)
  common = dict(max_new_tokens=new, pad_id=tokenizer.pad_id, vocab_limit=tokenizer.vocab_size)
  plain = lambda p: sampler.generate(params, [p], jax.random.key(0), temperature=0.0, **common)
  drafters = [(f'MTP depth, gamma={g}', 'mtp', g, speculative.make_drafter(
      'mtp', cfg.model, max_len=max_len, gamma=g, target_model=model, target_params=params)) for g in args.gammas]
  drafters += [(f'prompt lookup (n<=3), gamma={g}', 'lookup', g, speculative.PromptLookupDrafter(3, 1))
               for g in args.lookup_gammas]
  rows = []
  for name, kind, gamma, drafter in drafters:

    def spec(p, drafter=drafter, gamma=gamma):
      return speculative.speculative_generate(sampler, params, drafter, [p], jax.random.key(0), gamma=gamma, **common)
    log(f'mtp part: {name}: compiling')
    plain(prompts[0]), spec(prompts[0])
    plain_s = spec_s = 0.0
    accepted = proposed = generated = row_steps = 0
    for p in prompts:  # per prompt: the median of `mtp_repeats` runs of each, alternating
      times = {'plain': [], 'spec': []}
      for _ in range(args.mtp_repeats):
        start = time.perf_counter()
        reference = plain(p)
        times['plain'].append(time.perf_counter() - start)
        start = time.perf_counter()
        out, stats = spec(p)
        times['spec'].append(time.perf_counter() - start)
        assert out == reference, f'{name}: speculative output differs from plain greedy'
      plain_s += statistics.median(times['plain'])
      spec_s += statistics.median(times['spec'])
      accepted, proposed = accepted + stats['accepted'], proposed + stats['proposed']
      generated, row_steps = generated + stats['generated_tokens'], row_steps + stats['row_steps']
    row = dict(part='mtp', drafter=name, kind=kind, gamma=gamma, prompts=len(prompts), prompt_len=len(prompts[0]),
               new_tokens=new, plain_seconds=plain_s, spec_seconds=spec_s, plain_tokens_per_s=generated / plain_s,
               spec_tokens_per_s=generated / spec_s, speedup=plain_s / spec_s, acceptance_rate=accepted / proposed,
               tokens_per_target_step=generated / row_steps, same_as_greedy=True)
    # A round (draft + verify forward) costs tokens per step / speedup plain decode steps.
    row['round_cost_in_plain_steps'] = row['tokens_per_target_step'] / row['speedup']
    rows.append(row)
    print(json.dumps(row), flush=True)
  facts = dict(weights=weights, checkpoint=ckpt, params=int(sum(x.size for x in jax.tree.leaves(params))))
  return rows, facts


def print_mtp(rows: list[dict], facts: dict) -> None:
  print(f'\n(3) speculative decoding with the MTP depth, batch 1, greedy: {facts["weights"]} '
        f'({facts["params"]:,d} params incl. MTP); {rows[0]["prompts"]} held-out stdlib prompts of '
        f'{rows[0]["prompt_len"]} bytes, {rows[0]["new_tokens"]} new tokens; outputs identical to plain greedy')
  print(f'{"drafter":>32} {"accept":>7} {"tok/step":>8} {"plain s":>8} {"spec s":>8} {"plain tok/s":>11} '
        f'{"spec tok/s":>10} {"speedup":>8} {"round cost":>10}')
  for r in rows:
    print(f'{r["drafter"]:>32} {r["acceptance_rate"]:7.1%} {r["tokens_per_target_step"]:8.2f} '
          f'{r["plain_seconds"]:8.2f} {r["spec_seconds"]:8.2f} {r["plain_tokens_per_s"]:11.1f} '
          f'{r["spec_tokens_per_s"]:10.1f} {r["speedup"]:7.2f}x {r["round_cost_in_plain_steps"]:10.2f}')
  print('round cost: one draft + verify round in plain decode steps (tokens per target step / speedup); speculation '
        'wins when it is below the tokens per target step')


# ---------------------------------------------------------------- main


def merge_results(path: str, parts: list[str], rows: list[dict], meta: dict) -> tuple[list[dict], dict]:
  """This run's rows and facts over those of an earlier run of other parts in `path` (if any)."""
  if not os.path.exists(path):
    return rows, meta
  with open(path) as f:
    old = json.load(f)
  kept = [r for r in old.get('rows', []) if r.get('part') not in parts]
  # Facts of an earlier run stay unless this run replaced every part they describe (settings_<parts>).
  stale = lambda key: key.startswith('settings_') and set(key[len('settings_'):].split('_')) <= set(parts)
  old_meta = {key: value for key, value in old.items() if key not in ('rows', 'device', 'date') and not stale(key)}
  old_meta.update(meta)
  return kept + rows, old_meta


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--parts', default=','.join(PARTS), help='comma list of moe, mla, mtp')
  parser.add_argument('--small', action='store_true', help='shrink every size (smoke test)')
  parser.add_argument('--moe_shapes', default='1024x352x64x6x512,1024x352x64x6x2048,256x176x8x2x2048',
                      help='D x F x E x k x N, comma list')
  parser.add_argument('--moe_repeats', type=int, default=2, help='timed calls per MoE measurement (a grouped '
                      'forward+backward at V2-Lite/4 shapes takes ~25 s on 2 cores)')
  parser.add_argument('--max_temp_gb', type=float, default=8.0, help='skip an MoE timing needing more temporaries')
  parser.add_argument('--hidden', type=int, default=1024)
  parser.add_argument('--heads', type=int, default=16)
  parser.add_argument('--layers', type=int, default=8)
  parser.add_argument('--head_dim', type=int, default=64, help='MHA head size')
  parser.add_argument('--mlp_dim', type=int, default=2816)
  parser.add_argument('--kv_lora_rank', type=int, default=256)
  parser.add_argument('--qk_rope', type=int, default=32)
  parser.add_argument('--qk_nope', type=int, default=64)
  parser.add_argument('--v_head', type=int, default=64)
  parser.add_argument('--contexts', default='512,2048', help='prompt tokens before the timed decode steps')
  parser.add_argument('--batches', default='1,8')
  parser.add_argument('--decode_steps', type=int, default=8, help='N of the N - 1 decode-step difference')
  parser.add_argument('--mla_repeats', type=int, default=2, help='alternating timed runs per decode measurement')
  parser.add_argument('--cache_context', type=int, default=4096, help='context of the cache-bytes column')
  parser.add_argument('--mtp_checkpoint', default='', help='a configs/tiny_moe.py-like checkpoint with MTP (default: '
                      f'{DEFAULT_MTP_CHECKPOINT} if it exists, else one trained --train_steps steps)')
  parser.add_argument('--train_steps', type=int, default=200)
  parser.add_argument('--mtp_prompts', type=int, default=8)
  parser.add_argument('--mtp_prompt_len', type=int, default=384)
  parser.add_argument('--mtp_new_tokens', type=int, default=96)
  parser.add_argument('--mtp_repeats', type=int, default=3, help='alternating runs per prompt (the median is used)')
  parser.add_argument('--gammas', default='1,2,3', help='MTP draft lengths')
  parser.add_argument('--lookup_gammas', default='2,3', help='prompt-lookup draft lengths ("" for none)')
  parser.add_argument('--out', default=os.path.join(
      ROOT, 'bench', 'results', f'deepseek_cpu_{datetime.date.today().isoformat()}.json'))
  args = parser.parse_args()
  if args.small:
    defaults = {action.dest: action.default for action in parser._actions}  # pylint: disable=protected-access
    for key, value in SMALL.items():
      if getattr(args, key) == defaults[key]:  # flags given explicitly win
        setattr(args, key, value)
  parts = [p for p in args.parts.split(',') if p]
  if unknown := set(parts) - set(PARTS):
    parser.error(f'unknown parts {sorted(unknown)}; choose from {PARTS}')
  if not args.mtp_checkpoint and os.path.isdir(DEFAULT_MTP_CHECKPOINT) and not args.small:
    args.mtp_checkpoint = DEFAULT_MTP_CHECKPOINT
  to_ints = lambda text: [int(x) for x in str(text).split(',') if x]
  args.contexts, args.batches = to_ints(args.contexts), to_ints(args.batches)
  args.gammas, args.lookup_gammas = to_ints(args.gammas), to_ints(args.lookup_gammas)
  shapes = [tuple(int(v) for v in s.split('x')) for s in args.moe_shapes.split(',') if s]
  if any(len(s) != 5 for s in shapes):
    parser.error('--moe_shapes: each entry is D x F x E x k x N')

  rows, meta = [], {}
  results = {}
  if 'moe' in parts:
    results['moe'] = bench_moe(shapes, args.moe_repeats, args.max_temp_gb)
    rows += results['moe']
  if 'mla' in parts:
    results['mla'], meta['mla_models'] = bench_mla(args)
    rows += results['mla']
  if 'mtp' in parts:
    results['mtp'], meta['mtp'] = bench_mtp(args)
    rows += results['mtp']

  print(f'\ndevice: {jax.devices()[0].device_kind} ({os.cpu_count()} CPUs visible), {datetime.date.today()}')
  if 'moe' in results:
    print_moe(results['moe'])
  if 'mla' in results:
    print_mla(results['mla'], meta['mla_models'])
  if 'mtp' in results:
    print_mtp(results['mtp'], meta['mtp'])
  settings = {k: v for k, v in vars(args).items() if k != 'out'}
  rows, meta = merge_results(args.out, parts, rows, {**meta, f'settings_{"_".join(parts)}': settings})
  write_results(args.out, rows, **meta)
  log(f'wrote {args.out}')


if __name__ == '__main__':
  main()
