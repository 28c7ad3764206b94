"""Configs: presets have the published sizes, validation names the bad field, the CLI fails in one line."""
import os
import subprocess
import sys

from flax import linen as nn
import jax
import jax.numpy as jnp
import pytest

from dsjax import config as config_lib
from dsjax.model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
  return config_lib.load_config(os.path.join(ROOT, 'configs', name))


def abstract_param_count(model_cfg):
  """Parameter count from abstract shapes only: nothing is allocated."""
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  shapes = jax.eval_shape(
      lambda t: Transformer(model_cfg).init(jax.random.key(0), t, jnp.zeros(t.shape, jnp.int32)), tokens)
  return sum(x.size for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes['params'])))


def llama_param_count(vocab, hidden, layers, heads, kv_heads, mlp, tied=False):
  """Closed-form count of a LLaMA-layout decoder (no biases)."""
  head_dim = hidden // heads
  attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
  per_layer = attention + 3 * hidden * mlp + 2 * hidden
  return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


def test_deepseek_coder_1p3b_has_the_published_parameter_count():
  cfg = load('deepseek_coder_1p3b.py')
  assert abstract_param_count(cfg.model) == 1_346_471_936
  assert (cfg.model.positions.rope_theta, cfg.model.positions.rope_scaling_factor) == (100000.0, 4.0)
  assert cfg.model.max_positions == 16384 and cfg.model.norm_eps == 1e-6 and not cfg.model.tie_embeddings


@pytest.mark.parametrize('name, sizes', [
    ('deepseek_coder_6p7b.py', (32256, 4096, 32, 32, 32, 11008)),
    ('deepseek_coder_33b.py', (32256, 7168, 62, 56, 8, 19200)),
])
def test_larger_presets_match_closed_form_counts(name, sizes):
  assert abstract_param_count(load(name).model) == llama_param_count(*sizes)


def test_tiny_is_a_few_million_parameters():
  cfg = load('tiny.py')
  count = abstract_param_count(cfg.model)
  m = cfg.model
  assert count == llama_param_count(m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads,
                                    m.mlp_dim)
  assert 1_000_000 < count < 10_000_000


def test_every_config_file_loads_and_validates():
  for folder in ('configs', os.path.join('configs', 'ablations')):
    for name in os.listdir(os.path.join(ROOT, folder)):
      if name.endswith('.py') and name != '__init__.py':
        config_lib.load_config(os.path.join(ROOT, folder, name))


@pytest.mark.parametrize('field, value, fragment', [
    ('model.num_heads', 7, 'model.num_heads'),
    ('model.num_kv_heads', 3, 'model.num_kv_heads'),
    ('model.attention.window', 0, 'model.attention.window'),
    ('model.attention.kind', 'dense', 'model.attention.kind'),
    ('model.attention.impl', 'cuda', 'model.attention.impl'),
    ('model.positions.kind', 'xl', 'model.attention.impl'),  # with impl=pallas, set below
    ('model.positions.kind', 'alibi', 'model.positions.kind'),
    ('model.dtype', 'int8', 'model.dtype'),
    ('model.remat', 'sometimes', 'model.remat'),
    ('train.steps', -1, 'train.steps'),
    ('data.validation_fraction', 1.5, 'data.validation_fraction'),
    ('data.tokenizer', '/no/such/tokenizer.json', 'data.tokenizer'),
    ('model.positions.mem_len', 16, 'model.positions.mem_len'),
])
def test_impossible_values_name_the_field(field, value, fragment):
  cfg = load('tiny.py')
  section, _, key = field.rpartition('.')
  node = cfg
  for part in section.split('.'):
    node = node[part]
  node[key] = value
  if (field, value) == ('model.positions.kind', 'xl'):
    cfg.model.attention.impl = 'pallas'
  with pytest.raises(config_lib.ConfigError, match=fragment.replace('.', r'\.')):
    config_lib.validate(cfg)


def test_routed_top_k_larger_than_routed_heads_is_rejected():
  cfg = load('tiny.py')
  cfg.model.attention.kind = 'routed'
  cfg.model.attention.num_shared_heads = 6
  cfg.model.attention.top_k = 3
  with pytest.raises(config_lib.ConfigError, match=r'model\.attention\.top_k'):
    config_lib.validate(cfg)


def test_locked_config_rejects_unknown_fields():
  cfg = load('tiny.py')
  with pytest.raises(AttributeError):
    cfg.model.hiden_size = 3


def run_train(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)


@pytest.mark.parametrize('args, fragment', [
    (['--config.train.stepz=5'], 'config.train.stepz'),
    (['--config.modelx.a=1'], 'config.modelx.a'),
    (['--config.train.steps=abc'], 'config.train.steps'),
    (['--config.model.num_heads=7'], 'model.num_heads'),
    (['--config.model.attention.kind=dense'], 'model.attention.kind'),
    (['--config=configs/missing.py'], 'configs/missing.py'),
    (['--config.data.source=/no/such/corpus'], '/no/such/corpus'),
    (['--config.data.source=EMPTY_DIR'], 'config.data.source'),
])
def test_cli_errors_are_one_line_and_name_the_problem(args, fragment, tmp_path):
  result = run_train(*[a.replace('EMPTY_DIR', str(tmp_path)) for a in args])
  assert result.returncode == 2, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: ') and fragment in lines[0], result.stderr
  assert 'Traceback' not in result.stderr
