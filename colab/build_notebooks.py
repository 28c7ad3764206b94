"""Writes the Colab notebooks in this folder from the cell sources below (this file is their source of truth):

  python colab/build_notebooks.py          # rewrites colab/{quickstart,ablation,kernels,serving}.ipynb
  python colab/build_notebooks.py --check  # exits 1 if a committed notebook differs from what this file builds

The notebooks are committed without outputs. Each one opens with the same install cell (Colab: clone + pip install
with the accelerator's JAX extra; elsewhere: use the checkout / installed package as is) and a cell tagged
`parameters` whose defaults suit a Colab accelerator; `DSJAX_NOTEBOOK_SMOKE=1` in the environment shrinks every
knob so that tests/test_notebooks.py can execute the notebooks on CPU in seconds (papermill can also override the
tagged cell). Cell ids are fixed so that rebuilding gives byte-identical files.
"""
from __future__ import annotations

import os
import sys
import textwrap

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_PLACEHOLDER = 'https://github.com/OWNER/dsjax.git'  # README.md ("Colab") says to point DSJAX_REPO at the repo

INSTALL = '''\
# Install: on Colab, clone the repo and pip-install it with the runtime's JAX (jax[cuda12] on GPU, jax[tpu] on TPU);
# elsewhere (local Jupyter, the tests) nothing is installed: dsjax must already be importable.
import glob
import os
import shutil
import subprocess
import sys
import tempfile

DSJAX_REPO = os.environ.get('DSJAX_REPO', '{placeholder}')  # git URL or local checkout
EXTRA_PACKAGES = {extra_packages!r}
IN_COLAB = 'google.colab' in sys.modules


def detect_accelerator() -> str:
  """'tpu', 'gpu' or 'cpu', from the runtime itself (before JAX starts)."""
  if (os.environ.get('COLAB_TPU_ADDR') or os.environ.get('TPU_NAME') or glob.glob('/dev/accel*')
      or glob.glob('/dev/vfio/[0-9]*')):
    return 'tpu'
  if shutil.which('nvidia-smi') and subprocess.run(['nvidia-smi', '-L'], capture_output=True).returncode == 0:
    return 'gpu'
  return 'cpu'


def find_checkout(start: str) -> str | None:
  """The dsjax checkout at or above `start` (a notebook opened from colab/), else None."""
  here = os.path.abspath(start)
  while True:
    if os.path.isfile(os.path.join(here, 'pyproject.toml')) and os.path.isdir(os.path.join(here, 'dsjax')):
      return here
    if os.path.dirname(here) == here:
      return None
    here = os.path.dirname(here)


ACCELERATOR = detect_accelerator()
if IN_COLAB:
  REPO_DIR = DSJAX_REPO if os.path.isdir(DSJAX_REPO) else '/content/dsjax'
  if not os.path.isdir(REPO_DIR):
    subprocess.run(['git', 'clone', '--depth=1', DSJAX_REPO, REPO_DIR], check=True)
  extra = {{'gpu': '[cuda]', 'tpu': '[tpu]'}}.get(ACCELERATOR, '')  # pyproject: cuda -> jax[cuda12], tpu -> jax[tpu]
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '-e', REPO_DIR + extra, *EXTRA_PACKAGES], check=True)
else:
  REPO_DIR = find_checkout(os.getcwd()) or (DSJAX_REPO if os.path.isdir(DSJAX_REPO) else None)
if REPO_DIR and REPO_DIR not in sys.path:
  sys.path.insert(0, REPO_DIR)  # an editable install made by this kernel is on sys.path only after a restart

{probe}'''


PROBE_IN_KERNEL = """\
import jax

print(f'python: {sys.executable}')
print(f'accelerator: {ACCELERATOR}; jax {jax.__version__}, backend {jax.default_backend()}: {jax.devices()}')
if ACCELERATOR != 'cpu' and jax.default_backend() == 'cpu':
  print(f'warning: a {ACCELERATOR} runtime but JAX runs on CPU: restart the runtime (Runtime > Restart session) '
        'and run this cell again')
"""

# For notebooks whose work runs in a subprocess: a TPU belongs to one process, so this kernel must not start JAX.
PROBE_IN_SUBPROCESS = """\
print(f'python: {sys.executable}')
PROBE = ('import jax; print(f"jax {jax.__version__}, backend {jax.default_backend()}: {jax.devices()}")')
SUBPROCESS_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_DIR, os.environ.get('PYTHONPATH')])))
probe = subprocess.run([sys.executable, '-c', PROBE], capture_output=True, text=True, env=SUBPROCESS_ENV)
print(f'accelerator: {ACCELERATOR}; ' + (probe.stdout.strip() or probe.stderr.strip()[-500:]))
"""


def install_cell(extra_packages: tuple[str, ...] = (), jax_in_kernel: bool = True) -> str:
  probe = PROBE_IN_KERNEL if jax_in_kernel else PROBE_IN_SUBPROCESS
  return INSTALL.format(placeholder=REPO_PLACEHOLDER, extra_packages=tuple(extra_packages), probe=probe)


def md(text: str) -> tuple[str, str]:
  return ('markdown', textwrap.dedent(text).strip())


def code(text: str, *tags: str) -> tuple[str, str, tuple[str, ...]]:
  return ('code', textwrap.dedent(text).strip(), tags)


INTRO_INSTALL = md('''
    **Install.** On Colab this clones the repo named by `DSJAX_REPO` (set it in the environment or edit the cell;
    it may also be a checkout on a mounted Drive) and installs it with the JAX build for the runtime: GPU runtimes
    get `jax[cuda12]`, TPU runtimes `jax[tpu]`, CPU runtimes plain `jax`. Outside Colab nothing is installed.
    ''')

# ---------------------------------------------------------------------------------------------------- quickstart
QUICKSTART = [
    md('''
    # dsjax quickstart: train a tiny code model, then sample from it

    The tiny config (`configs/tiny.py`: 3.1M parameters, byte-level tokens) trains on the embedded corpus, the
    Python standard library's own sources, with `dsjax.experiment.train`. We plot its loss curve and sample code
    completions with the jitted KV-cache `Sampler`.
    '''),
    INTRO_INSTALL,
    code(install_cell()),
    md('''
    **Parameters.** Defaults suit a Colab accelerator (a few minutes on a T4 or TPU; ~7 minutes on CPU with
    `BATCH_SIZE=8`). `DSJAX_NOTEBOOK_SMOKE=1` (the tests) shrinks them to seconds on CPU.
    '''),
    code('''
    STEPS = 400               # training steps
    BATCH_SIZE = 32           # sequences per step (a multiple of the device count)
    SEQ_LEN = 256             # tokens per sequence
    ATTENTION = 'sparse'      # full | sparse (sliding window + global sink tokens) | routed (top-k heads)
    PROMPTS = ['def fibonacci(n):', 'import os\\n\\n\\ndef ', 'class Stack:\\n    def ']
    MAX_NEW_TOKENS = 96
    TEMPERATURE = 0.7

    SMOKE = os.environ.get('DSJAX_NOTEBOOK_SMOKE') == '1'
    if SMOKE:  # seconds on CPU: a 2-layer model, 6 steps of 4 x 64 tokens
      STEPS, BATCH_SIZE, SEQ_LEN, MAX_NEW_TOKENS = 6, 4, 64, 16
    ''', 'parameters'),
    md('## Config\nStart from `configs/tiny.py` and override fields, exactly like '
       '`python train.py --config.train.steps=...` does.'),
    code('''
    from configs import tiny
    from dsjax import config as config_lib

    cfg = tiny.get_config()
    cfg.train.steps = STEPS
    cfg.train.batch_size = BATCH_SIZE
    cfg.data.seq_len = SEQ_LEN
    cfg.model.attention.kind = ATTENTION
    cfg.train.eval_every = max(STEPS // 4, 1)
    cfg.train.num_samples = 0  # we sample below instead
    if jax.default_backend() != 'cpu':
      cfg.model.dtype = 'bfloat16'  # fp32 master weights, bf16 compute
    if SMOKE:
      cfg.model.update(num_layers=2, hidden_size=64, mlp_dim=128, num_heads=4, num_kv_heads=2)
      cfg.data.eval_batches = 1
      cfg.train.update(log_every=1, progress_bar=False)
      cfg.optim.warmup_steps = 2
    config_lib.validate(cfg)
    print(cfg.model)
    '''),
    md('## Train'),
    code('''
    from dsjax import experiment

    run = experiment.train(cfg)
    steps = [r['step'] for r in run['history']]
    losses = [r['loss'] for r in run['history']]
    print(f'final train loss: {losses[-1]:.4f}')
    print(f"held-out: {run['final_eval']['bits_per_byte']:.3f} bits/byte "
          f"(unigram baseline {run['unigram']['bits_per_byte']:.3f})")
    '''),
    code('''
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, label='train')
    ax.plot([e['step'] for e in run['evals']], [e['loss'] for e in run['evals']], 'o-', label='held-out')
    ax.set_xlabel('step')
    ax.set_ylabel('loss (nats/token)')
    ax.set_title(f'{run["num_params"]:,} parameters, attention={cfg.model.attention.kind}')
    ax.legend()
    plt.show()
    '''),
    md('## Sample\n`Sampler` prefills the prompts into a KV cache and decodes in one jitted `lax.while_loop`.'),
    code('''
    from dsjax.data import tokenizer as tokenizer_lib
    from dsjax.model import Transformer
    from dsjax.sample.sampler import Sampler

    tokenizer = tokenizer_lib.from_config(cfg.data)
    prompt_ids = [[tokenizer.bos_id] + list(tokenizer.encode(p)) for p in PROMPTS]
    sampler = Sampler(Transformer(cfg.model), max_len=max(map(len, prompt_ids)) + MAX_NEW_TOKENS)
    new_tokens = sampler.generate(run['params'], prompt_ids, jax.random.key(0), max_new_tokens=MAX_NEW_TOKENS,
                                  temperature=TEMPERATURE, stop_ids=[tokenizer.eos_id], pad_id=tokenizer.pad_id,
                                  vocab_limit=tokenizer.vocab_size)
    for prompt, tokens in zip(PROMPTS, new_tokens):
      print(f'--- sample ({len(tokens)} new tokens) ---')
      print(prompt + tokenizer.decode(tokens))
    '''),
]

# ---------------------------------------------------------------------------------------------------- kernels
KERNELS = [
    md('''
    # Sparse attention kernel vs its reference

    `pallas_kernels.sparse_attention` is block-sparse flash attention (causal, sliding window, global sink tokens,
    packed documents) written in Pallas: Triton on GPUs, Mosaic on TPUs, and Pallas' interpret mode on CPU. Here we
    check it against the dense pure-jnp `sparse_attention_reference` (forward and gradients) and time both on this
    runtime's accelerator. `bench/attention.py` is the full benchmark (`docs/benchmarks.md`).
    '''),
    INTRO_INSTALL,
    code(install_cell()),
    md('**Parameters.** Shapes for timing on an accelerator; on CPU (interpret mode) the smoke settings are tiny.'),
    code('''
    BATCH, HEADS, KV_HEADS, HEAD_DIM = 1, 16, 16, 128
    SEQ_LENS = [1024, 4096]        # timed sequence lengths
    WINDOWS = [None, 256]          # None: full causal attention
    NUM_GLOBAL = 4                 # sink tokens every query sees (windowed rows)
    DTYPE = 'bfloat16'             # for timing; the accuracy check always runs in float32
    REPEATS = 10
    CHECK_SHAPE = dict(batch=2, seq_len=256, heads=4, kv_heads=2, head_dim=64)  # accuracy check (fp32)
    BLOCK = None                   # kernel tile (None: the backend's default)

    SMOKE = os.environ.get('DSJAX_NOTEBOOK_SMOKE') == '1'
    if SMOKE or jax.default_backend() == 'cpu':  # interpret mode: tiny shapes and tiles, timed = checked shape
      BATCH, HEADS, KV_HEADS, HEAD_DIM, SEQ_LENS, WINDOWS, DTYPE, REPEATS = 1, 4, 2, 32, [128], [None, 32], 'float32', 2
      CHECK_SHAPE = dict(batch=BATCH, seq_len=SEQ_LENS[0], heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
      BLOCK = 32
    ''', 'parameters'),
    md('## Inputs\nTwo packed documents per row (segment ids, per-document positions), GQA when `kv_heads < heads`.'),
    code('''
    import functools
    import time

    import jax.numpy as jnp
    import numpy as np
    from pallas_kernels.sparse_attention import sparse_attention, sparse_attention_reference

    BACKEND = 'tpu' if jax.default_backend() == 'tpu' else 'gpu'  # the kernel family ('gpu' is interpreted on CPU)
    INTERPRET = jax.default_backend() not in ('gpu', 'tpu')


    def make_inputs(batch, seq_len, heads, kv_heads, head_dim, dtype, seed=0):
      keys = jax.random.split(jax.random.key(seed), 3)
      q = jax.random.normal(keys[0], (batch, seq_len, heads, head_dim), dtype)
      k = jax.random.normal(keys[1], (batch, seq_len, kv_heads, head_dim), dtype)
      v = jax.random.normal(keys[2], (batch, seq_len, kv_heads, head_dim), dtype)
      split = seq_len * 3 // 4  # documents [0, split) and [split, seq_len)
      t = np.arange(seq_len)
      pos = jnp.asarray(np.broadcast_to(np.where(t < split, t, t - split), (batch, seq_len)), jnp.int32)
      seg = jnp.asarray(np.broadcast_to(np.where(t < split, 1, 2), (batch, seq_len)), jnp.int32)
      return q, k, v, pos, seg


    def attention_fns(window, interpret=INTERPRET):
      kw = dict(window=window, num_global=NUM_GLOBAL if window else 0)
      kernel = lambda q, k, v, pos, seg: sparse_attention(q, k, v, pos, pos, seg, seg, backend=BACKEND,
                                                          interpret=interpret, block_q=BLOCK, block_k=BLOCK, **kw)
      reference = lambda q, k, v, pos, seg: sparse_attention_reference(q, k, v, pos, pos, seg, seg, **kw)
      return {'kernel': kernel, 'reference': reference}


    @functools.cache  # one pair of jitted functions per (window, impl, interpret): compiled once per shape
    def jitted(window, impl, interpret=INTERPRET):
      fn = attention_fns(window, interpret)[impl]
      loss = lambda q, k, v, pos, seg: jnp.sum(fn(q, k, v, pos, seg).astype(jnp.float32) ** 2)
      return jax.jit(fn), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


    print(f'kernel backend: {BACKEND}' + (' (Pallas interpret mode)' if INTERPRET else ''))
    '''),
    md('## Accuracy (float32): max |kernel - reference| of the output and of dq, dk, dv'),
    code('''
    def max_errors(window, interpret=INTERPRET):
      x = make_inputs(CHECK_SHAPE['batch'], CHECK_SHAPE['seq_len'], CHECK_SHAPE['heads'], CHECK_SHAPE['kv_heads'],
                      CHECK_SHAPE['head_dim'], jnp.float32)
      (kf, kg), (rf, rg) = jitted(window, 'kernel', interpret), jitted(window, 'reference', interpret)
      errors = {'out': float(jnp.max(jnp.abs(kf(*x) - rf(*x))))}
      for name, a, b in zip(('dq', 'dk', 'dv'), kg(*x), rg(*x)):
        errors[name] = float(jnp.max(jnp.abs(a - b)))
      return errors


    # Accelerator matmuls in float32 may use reduced-precision passes (TF32 on GPUs, bf16 passes on TPUs).
    TOLERANCE = 1e-4 if INTERPRET else 2e-2
    errors = {}
    for window in WINDOWS:
      try:
        errors[window] = max_errors(window)
      except Exception as e:  # e.g. a GPU too old for the Triton kernels: check the kernel logic in interpret mode
        print(f'window={window}: the compiled kernel failed ({type(e).__name__}: {str(e)[:200]}); interpret mode:')
        errors[window], TOLERANCE = max_errors(window, interpret=True), 1e-4
      print(f'window={window}: ' + ', '.join(f'{k} {v:.2e}' for k, v in errors[window].items()))
    MAX_ERROR = max(max(e.values()) for e in errors.values())
    print(f'max abs error (fp32) over outputs and gradients: {MAX_ERROR:.3e} (tolerance {TOLERANCE:g})')
    assert MAX_ERROR < TOLERANCE, MAX_ERROR
    '''),
    md('## Timing\nMedian wall time after a warm-up call (compilation excluded), forward and forward+backward.'),
    code('''
    def median_ms(fn, *args, repeats=REPEATS):
      jax.block_until_ready(fn(*args))
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
      return 1e3 * float(np.median(times))


    rows = []
    for seq_len in SEQ_LENS:
      x = make_inputs(BATCH, seq_len, HEADS, KV_HEADS, HEAD_DIM, jnp.dtype(DTYPE))
      for window in WINDOWS:
        for impl in ('kernel', 'reference'):
          fwd, grad = jitted(window, impl)
          row = dict(seq_len=seq_len, window=window, impl=impl)
          try:
            row.update(fwd_ms=median_ms(fwd, *x), fwd_bwd_ms=median_ms(grad, *x))
          except Exception as e:  # e.g. the dense reference running out of memory at long sequences
            row['error'] = f'{type(e).__name__}: {str(e)[:80]}'
          rows.append(row)

    print(f'device: {jax.devices()[0].device_kind}; B={BATCH} N={HEADS} K={KV_HEADS} H={HEAD_DIM} {DTYPE}')
    print(f'{"seq_len":>8} {"window":>7} {"impl":>10} {"fwd ms":>10} {"fwd+bwd ms":>11} {"speedup":>8}')
    for row in rows:
      ref = next(r for r in rows if r['seq_len'] == row['seq_len'] and r['window'] == row['window']
                 and r['impl'] == 'reference')
      head = f'{row["seq_len"]:>8} {str(row["window"]):>7} {row["impl"]:>10}'
      if 'error' in row:
        print(f'{head} {row["error"]}')
        continue
      speedup = ref['fwd_bwd_ms'] / row['fwd_bwd_ms'] if 'fwd_bwd_ms' in ref else float('nan')
      print(f'{head} {row["fwd_ms"]:10.3f} {row["fwd_bwd_ms"]:11.3f} {speedup:7.2f}x')
    '''),
    md('''
    On CPU the kernel runs in Pallas' interpret mode (a correctness tool, slower than the dense reference); the
    speedup is meaningful on a GPU or TPU runtime, where skipped blocks (outside the window) are never loaded.
    '''),
]

# ---------------------------------------------------------------------------------------------------- serving
SERVING = [
    md('''
    # Serving: an OpenAI-compatible API over the continuous-batching engine

    We train a tiny model for a few steps (or save random weights), load the checkpoint the way `serve.py` does,
    start the server in this kernel (a thread running uvicorn on a free port; a second process could not share a
    TPU with this one), talk to it with the official `openai` client, streaming included, and shut it down.
    '''),
    INTRO_INSTALL,
    code(install_cell(('openai',))),
    code('''
    TRAIN_STEPS = 200           # 0: random weights (gibberish, but the API works the same)
    WORKDIR = '/tmp/dsjax_serving'
    NUM_SLOTS = 4               # concurrent decode slots
    MAX_LEN = 512               # prompt + completion tokens
    MAX_TOKENS = 48
    API_KEY = 'secret'

    SMOKE = os.environ.get('DSJAX_NOTEBOOK_SMOKE') == '1'
    if SMOKE:  # a fresh workdir, so concurrent smoke runs (tests) do not collide
      TRAIN_STEPS, NUM_SLOTS, MAX_LEN, MAX_TOKENS = 0, 2, 128, 8
      WORKDIR = tempfile.mkdtemp(prefix='dsjax_serving_')
    ''', 'parameters'),
    md('## A checkpoint\n`experiment.train` writes `<workdir>/checkpoint`; with `TRAIN_STEPS = 0`,\n'
       '`checkpoint.save_model` writes freshly initialised weights in the same format.'),
    code('''
    from configs import tiny
    from dsjax.model import Transformer
    from dsjax import checkpoint
    from dsjax import experiment
    from dsjax.train import state as state_lib

    cfg = tiny.get_config()
    if SMOKE:
      cfg.model.update(num_layers=2, hidden_size=64, mlp_dim=128, num_heads=4, num_kv_heads=2)
    shutil.rmtree(WORKDIR, ignore_errors=True)
    CHECKPOINT = os.path.join(WORKDIR, 'checkpoint')
    if TRAIN_STEPS:
      cfg.train.update(steps=TRAIN_STEPS, workdir=WORKDIR, num_samples=0, batch_size=32 if ACCELERATOR != 'cpu' else 8)
      CHECKPOINT = experiment.train(cfg)["checkpoint"]
    else:
      params = state_lib.init_params(Transformer(cfg.model), jax.random.key(0), seq_len=16)
      checkpoint.save_model(CHECKPOINT, cfg, params)
    print(sorted(os.listdir(CHECKPOINT)))
    '''),
    md('## Start the server\nThe same steps as `serve.py --checkpoint=...`: config, params, tokenizer, engine, app.'),
    code('''
    import socket
    import threading
    import time

    import uvicorn
    from dsjax.data import tokenizer as tokenizer_lib
    from dsjax.sample import engine as engine_lib
    from dsjax.serve.api import create_app
    from dsjax.serve.chat import read_chat_template

    serve_cfg = checkpoint.load_config(CHECKPOINT)
    params = checkpoint.load_params(CHECKPOINT, serve_cfg.model)
    tokenizer = tokenizer_lib.from_config(serve_cfg.data)
    engine = engine_lib.Engine(Transformer(serve_cfg.model), params, num_slots=NUM_SLOTS, max_len=MAX_LEN,
                               max_queue=16, vocab_limit=tokenizer.vocab_size)
    app = create_app(engine, tokenizer, 'tiny', api_key=API_KEY, max_len=MAX_LEN,
                     chat_template=read_chat_template(CHECKPOINT), shutdown_engine=True)

    with socket.socket() as s:  # a free port
      s.bind(('127.0.0.1', 0))
      PORT = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=PORT, log_level='warning'))
    server_thread = threading.Thread(target=server.run, daemon=True)
    server_thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
      time.sleep(0.05)
    assert server.started, 'the server did not start'
    BASE_URL = f'http://127.0.0.1:{PORT}/v1'
    print(f'serving on {BASE_URL}')
    '''),
    md('## Query it with the `openai` client'),
    code('''
    import openai

    client = openai.OpenAI(base_url=BASE_URL, api_key=API_KEY, max_retries=0, timeout=120)
    print('models:', [m.id for m in client.models.list().data])

    completion = client.completions.create(model='tiny', prompt='def fibonacci(n):', max_tokens=MAX_TOKENS,
                                           temperature=0)
    print('completion:', repr(completion.choices[0].text), completion.usage)

    chunks = client.completions.create(model='tiny', prompt='def fibonacci(n):', max_tokens=MAX_TOKENS,
                                       temperature=0, stream=True)
    streamed = ''.join(chunk.choices[0].text for chunk in chunks)
    print('streamed completion matches:', streamed == completion.choices[0].text)

    messages = [{'role': 'system', 'content': 'You write Python.'},
                {'role': 'user', 'content': 'Reverse a list.'}]
    chat = client.chat.completions.create(model='tiny', messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    print('chat:', repr(chat.choices[0].message.content))
    stream = client.chat.completions.create(model='tiny', messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True)
    streamed_chat = ''.join(chunk.choices[0].delta.content or '' for chunk in stream if chunk.choices)
    print('streamed chat matches:', streamed_chat == chat.choices[0].message.content)
    assert streamed == completion.choices[0].text and streamed_chat == chat.choices[0].message.content
    print('the server answered')
    '''),
    md('## Shut down\nuvicorn stops accepting connections and the app\'s shutdown stops the engine thread.'),
    code('''
    server.should_exit = True
    server_thread.join(timeout=30)
    engine.shutdown(cancel=True, timeout=5.0)
    print('server stopped:', not server_thread.is_alive())
    '''),
]

# ---------------------------------------------------------------------------------------------------- ablation
ABLATION = [
    md('''
    # An ablation study

    `python -m dsjax.ablate configs/ablations/<study>.py --workdir=DIR --steps=N` trains every run of a study with
    the same data order, seeds and evaluation, then writes `results.md` / `.csv` / `.json` and plots
    (`loss_curves.png`, `bits_per_byte.png`, `tokens_per_s.png`, `memory.png`) to the workdir. We run a small study
    and show its table and plots.
    '''),
    INTRO_INSTALL,
    code(install_cell(jax_in_kernel=False)),
    code('''
    STUDY = 'configs/ablations/attention_kinds.py'  # a study file (get_study()) under configs/ablations/
    ONLY = ['full', 'sparse']                       # runs of the study to do ([]: all of them)
    STEPS = 300                                     # training steps per run (0: the study's)
    BATCH_SIZE = 32                                 # sequences per step (0: the study's)
    WORKDIR = '/tmp/dsjax_ablation'
    SETS = []                                       # more overrides for every run, e.g. ['data.seq_len=512']

    SMOKE = os.environ.get('DSJAX_NOTEBOOK_SMOKE') == '1'
    if SMOKE:  # seconds on CPU: 3 steps of a 1-layer model, in a fresh workdir
      STEPS, BATCH_SIZE = 3, 4
      WORKDIR = tempfile.mkdtemp(prefix='dsjax_ablation_')
      SETS = ['data.seq_len=64', 'data.eval_batches=1', 'train.eval_every=1000', 'train.log_every=1',
              'train.progress_bar=False', 'model.num_layers=1', 'model.hidden_size=64', 'model.mlp_dim=128',
              'model.num_heads=4', 'model.num_kv_heads=2', 'optim.warmup_steps=1']
    ''', 'parameters'),
    md('## Run the study\nIn a subprocess: its output streams here, and this kernel never holds the accelerator.'),
    code('''
    shutil.rmtree(WORKDIR, ignore_errors=True)
    command = [sys.executable, '-m', 'dsjax.ablate', os.path.join(REPO_DIR or '.', STUDY), f'--workdir={WORKDIR}',
               f'--steps={STEPS}', f'--batch_size={BATCH_SIZE}', *(f'--set={s}' for s in SETS)]
    if ONLY:
      command.append('--only=' + ','.join(ONLY))
    print(' '.join(command))
    with subprocess.Popen(command, cwd=REPO_DIR or None, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:
      for line in process.stdout:  # stream the runs' progress into the notebook
        print(line, end='')
    assert process.returncode == 0, f'dsjax.ablate exited with {process.returncode}'
    print(sorted(os.listdir(WORKDIR)))
    '''),
    md('## Results'),
    code('''
    from IPython.display import Image, Markdown, display

    with open(os.path.join(WORKDIR, 'results.md')) as f:
      display(Markdown(f.read()))
    for name in ('loss_curves.png', 'bits_per_byte.png', 'tokens_per_s.png', 'memory.png'):
      path = os.path.join(WORKDIR, name)
      if os.path.exists(path):
        print(name)
        display(Image(filename=path))
      else:
        print(f'{name}: not written')
    '''),
]

NOTEBOOKS = {
    'quickstart': QUICKSTART,
    'kernels': KERNELS,
    'serving': SERVING,
    'ablation': ABLATION,
}


def build(name: str, cells) -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.metadata = {
      'kernelspec': {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'},
      'language_info': {'name': 'python'},
      'accelerator': 'GPU',
      'colab': {'name': f'{name}.ipynb', 'provenance': []},
  }
  for i, cell in enumerate(cells):
    if cell[0] == 'markdown':
      new = nbformat.v4.new_markdown_cell(cell[1])
    else:
      new = nbformat.v4.new_code_cell(cell[1])
      if cell[2]:
        new.metadata['tags'] = list(cell[2])
    new.id = f'{name}-{i:02d}'
    nb.cells.append(new)
  nbformat.validate(nb)
  return nb


def main(argv: list[str]) -> int:
  check = '--check' in argv[1:]
  stale = []
  for name, cells in NOTEBOOKS.items():
    path = os.path.join(HERE, f'{name}.ipynb')
    text = nbformat.writes(build(name, cells)) + '\n'
    old = open(path).read() if os.path.exists(path) else None
    if old == text:
      continue
    if check:
      stale.append(path)
    else:
      with open(path, 'w') as f:
        f.write(text)
      print(f'wrote {path}')
  if stale:
    print('out of date (run python colab/build_notebooks.py): ' + ', '.join(stale))
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
