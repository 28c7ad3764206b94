"""Hugging Face interop against transformers itself (CPU, float32): tiny random LlamaForCausalLM models are saved,
imported and exported, and logits are compared with the ones transformers computes."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.convert import hf
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.model import Transformer
from dsjax import checkpoint
from dsjax.train import start as start_lib
from tests.lazy import torch, transformers  # imported on first use (the `hf` extra)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ATOL = 1e-4  # float32 on both sides; differences are summation order only

VARIANTS = {
    # name: LlamaConfig fields
    'mha_untied': dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=64, tie_word_embeddings=False),
    'gqa_tied_linear_rope': dict(hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=6,
                                 num_key_value_heads=2, vocab_size=97, tie_word_embeddings=True, rope_theta=100000.0,
                                 rope_scaling={'type': 'linear', 'factor': 4.0}),
    'odd_sizes_mqa': dict(hidden_size=40, intermediate_size=52, num_hidden_layers=2, num_attention_heads=5,
                          num_key_value_heads=1, vocab_size=101, tie_word_embeddings=False, rms_norm_eps=1e-5),
}


def make_hf_model(variant, directory, shard_size='2GB', seed=0, **overrides):
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(max_position_embeddings=128, **{**VARIANTS[variant], **overrides})
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # random norm scales: an import that skipped them would still pass with ones
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  model.save_pretrained(directory, max_shard_size=shard_size)
  return model


def hf_logits(model, tokens, attention_mask=None):
  with torch.no_grad():
    out = model(torch.tensor(np.asarray(tokens)), attention_mask=None if attention_mask is None
                else torch.tensor(attention_mask))
  return out.logits.numpy()


def dsjax_logits(cfg, params, tokens, positions=None, segment_ids=None):
  tokens = jnp.asarray(tokens)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  logits, _ = Transformer(cfg.model).apply({'params': params}, tokens, jnp.asarray(positions),
                                           segment_ids=None if segment_ids is None else jnp.asarray(segment_ids))
  return np.asarray(logits)


def imported(hf_dir, out_dir, **kwargs):
  cfg = hf.import_hf(str(hf_dir), str(out_dir), **kwargs)
  cfg.model.dtype = 'float32'
  return cfg, checkpoint.load_params(str(out_dir), cfg.model)


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_imported_logits_match_transformers(variant, tmp_path):
  model = make_hf_model(variant, tmp_path / 'hf', shard_size='20KB' if variant == 'mha_untied' else '2GB')
  if variant == 'mha_untied':
    assert os.path.isfile(tmp_path / 'hf' / hf.INDEX_FILE)  # exercised the sharded path
  cfg, params = imported(tmp_path / 'hf', tmp_path / 'ckpt')
  hf_cfg = VARIANTS[variant]
  assert cfg.model.num_kv_heads == hf_cfg['num_key_value_heads']
  assert cfg.model.tie_embeddings == hf_cfg['tie_word_embeddings']
  assert cfg.model.positions.rope_scaling_factor == hf_cfg.get('rope_scaling', {}).get('factor', 1.0)
  tokens = np.random.default_rng(1).integers(0, hf_cfg['vocab_size'], (3, 24))
  np.testing.assert_allclose(dsjax_logits(cfg, params, tokens), hf_logits(model, tokens), atol=ATOL, rtol=ATOL)


def test_packed_and_padded_rows_match_transformers_per_document(tmp_path):
  model = make_hf_model('gqa_tied_linear_rope', tmp_path / 'hf')
  cfg, params = imported(tmp_path / 'hf', tmp_path / 'ckpt')
  rng = np.random.default_rng(2)
  doc_a, doc_b = rng.integers(0, 97, 7), rng.integers(0, 97, 9)
  # One packed row: doc A, doc B, 4 padding tokens; positions restart per document, padding is segment 0.
  tokens = np.concatenate([doc_a, doc_b, np.zeros(4, np.int64)])[None]
  positions = np.concatenate([np.arange(7), np.arange(9), np.zeros(4, np.int64)])[None]
  segments = np.concatenate([np.full(7, 1), np.full(9, 2), np.zeros(4, np.int64)])[None]
  ours = dsjax_logits(cfg, params, tokens, positions, segments)[0]
  np.testing.assert_allclose(ours[:7], hf_logits(model, doc_a[None])[0], atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(ours[7:16], hf_logits(model, doc_b[None])[0], atol=ATOL, rtol=ATOL)
  # Right-padded batch through HF's attention mask.
  padded = np.zeros((2, 9), np.int64)
  padded[0, :7], padded[1] = doc_a, doc_b
  mask = (np.arange(9)[None] < np.array([[7], [9]])).astype(np.int64)
  theirs = hf_logits(model, padded, mask)
  ours = dsjax_logits(cfg, params, padded, segment_ids=mask)
  np.testing.assert_allclose(ours[0, :7], theirs[0, :7], atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(ours[1], theirs[1], atol=ATOL, rtol=ATOL)


def test_export_round_trip_loads_in_transformers_and_is_bit_identical(tmp_path):
  model = make_hf_model('odd_sizes_mqa', tmp_path / 'hf')
  cfg, params = imported(tmp_path / 'hf', tmp_path / 'ckpt')
  hf.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'exported'), max_shard_size='30KB')
  assert os.path.isfile(tmp_path / 'exported' / hf.INDEX_FILE)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'exported')).eval()
  tokens = np.random.default_rng(3).integers(0, 101, (2, 17))
  np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(model, tokens), atol=1e-6, rtol=1e-6)
  _, again = imported(tmp_path / 'exported', tmp_path / 'ckpt2')
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_bfloat16_checkpoint_round_trips_exactly(tmp_path):
  model = make_hf_model('mha_untied', tmp_path / 'hf')
  model.to(torch.bfloat16).save_pretrained(tmp_path / 'hf_bf16')
  cfg, params = imported(tmp_path / 'hf_bf16', tmp_path / 'ckpt')  # upcast to float32 master weights
  hf.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'exported'), dtype='bfloat16')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'exported'))
  for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
    assert a.dtype == b.dtype == torch.bfloat16
    assert torch.equal(a, b), name


@pytest.mark.slow  # heavy end-to-end run: kept out of the 10-minute default suite (pytest -m slow runs it)
def test_fine_tuned_checkpoint_exports_with_matching_logits(tmp_path):
  make_hf_model('gqa_tied_linear_rope', tmp_path / 'hf')
  cfg, params = imported(tmp_path / 'hf', tmp_path / 'ckpt')
  # A fine-tuning stand-in that touches every parameter: one gradient step on a random batch.
  tokens = np.random.default_rng(4).integers(0, 97, (2, 16))
  def loss(p):
    logits = Transformer(cfg.model).apply({'params': p}, tokens, jnp.broadcast_to(jnp.arange(16), (2, 16)))[0]
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])
  grads = jax.grad(loss)(params)
  tuned = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grads)
  checkpoint.save_model(str(tmp_path / 'tuned'), checkpoint.load_config(str(tmp_path / 'ckpt')), tuned)
  hf.export_hf(str(tmp_path / 'tuned'), str(tmp_path / 'exported'))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'exported')).eval()
  probe = np.random.default_rng(5).integers(0, 97, (2, 20))
  ours = dsjax_logits(cfg, tuned, probe)
  np.testing.assert_allclose(hf_logits(reloaded, probe), ours, atol=ATOL, rtol=ATOL)
  assert np.abs(ours - dsjax_logits(cfg, params, probe)).max() > 1e-2  # the step really changed the model


def test_import_places_params_on_the_mesh(tmp_path):
  make_hf_model('mha_untied', tmp_path / 'hf')
  cfg = checkpoint.load_config(str(hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'ckpt')).train.init_from))
  cfg.mesh.update(dict(data=1, fsdp=2, tensor=4))
  from dsjax import sharding
  mesh = sharding.make_mesh(cfg.mesh)
  params = checkpoint.load_params(str(tmp_path / 'ckpt'), cfg.model, mesh, cfg.mesh)
  q = params['layers']['attention']['q_proj']['kernel']  # [layers, embed, heads, head_dim]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)
  assert q.addressable_shards[0].data.shape == (2, 32 // 2, 4 // 4, 8)


def test_tokenizer_and_special_ids_come_from_the_hf_directory(tmp_path):
  make_hf_model('mha_untied', tmp_path / 'hf')
  texts = ['def f(x):\n    return x + 1\n', 'import os\nprint(os.getcwd())\n'] * 20
  tokenizer_lib.train_bpe(texts, 300, tmp_path / 'hf' / 'tokenizer.json', bos_token='<｜begin▁of▁sentence｜>',
                          eos_token='<｜end▁of▁sentence｜>')
  hf_config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  hf_config.update(vocab_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=None)
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps(hf_config))
  cfg = hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'ckpt'))
  assert cfg.data.tokenizer == str(tmp_path / 'ckpt' / 'tokenizer.json')
  tok = tokenizer_lib.from_config(cfg.data)
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  assert tok.decode(tok.encode('import os\n')) == 'import os\n'


def test_import_without_tokenizer_json_says_the_byte_tokenizer_is_used(tmp_path, capsys):
  """The import names the missing file and what the byte tokenizer means; the export of such a checkpoint writes no
  tokenizer (the model's own one is unknown) and says why."""
  make_hf_model('mha_untied', tmp_path / 'hf', vocab_size=300)
  cfg = hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'ckpt'))
  assert cfg.data.tokenizer == 'byte'
  err = capsys.readouterr().err
  assert 'no tokenizer.json' in err and "byte-level tokenizer (data.tokenizer='byte')" in err and 'UTF-8 bytes' in err
  hf.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'exported'))
  assert 'no tokenizer files written' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'exported' / 'tokenizer.json')


def test_byte_level_export_has_a_tokenizer_transformers_loads_with_dsjax_ids(tmp_path):
  """A dsjax-trained byte-level model: AutoTokenizer loads the exported tokenizer, which encodes (bos first, as
  dsjax's sampler) and decodes text, non-ASCII and special-token text included, to dsjax's ids; re-importing the
  export gives the same ids and specials. Weights and config.json get the same, umask-given file mode."""
  from dsjax import config as config_lib
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  cfg.model.update(dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=64,
                        attention=dict(kind='full')))
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = Transformer(cfg.model).init(jax.random.key(0), tokens, tokens)['params']
  checkpoint.save_model(str(tmp_path / 'ckpt'), cfg, params)
  old_umask = os.umask(0o022)
  try:
    hf.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'exported'))
  finally:
    os.umask(old_umask)
  modes = {f: os.stat(tmp_path / 'exported' / f).st_mode & 0o777 for f in ('model.safetensors', 'config.json')}
  assert modes == {'model.safetensors': 0o644, 'config.json': 0o644}

  ours = tokenizer_lib.ByteTokenizer()
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'exported'))
  text = "def grüße(x):\n  return '日本語 → ∑ 🙂' + \"<s></s>\"\t\r\n"
  ids = ours.encode(text).tolist()
  assert theirs.encode(text, add_special_tokens=False) == ids
  assert theirs(text).input_ids == [ours.bos_id] + ids
  assert theirs.decode([ours.bos_id] + ids + [ours.eos_id], skip_special_tokens=True) == text == ours.decode(ids)
  assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
  exported_config = json.loads((tmp_path / 'exported' / 'config.json').read_text())
  assert (exported_config['bos_token_id'], exported_config['eos_token_id']) == (ours.bos_id, ours.eos_id)
  again = tokenizer_lib.from_config(hf.import_hf(str(tmp_path / 'exported'), str(tmp_path / 'ckpt2')).data)
  assert again.encode(text).tolist() == ids and again.decode(ids) == text
  assert (again.bos_id, again.eos_id, again.pad_id, again.fim_ids) == (ours.bos_id, ours.eos_id, ours.pad_id,
                                                                       ours.fim_ids)


@pytest.mark.parametrize('edit, fragment', [
    (lambda c: c.update(hidden_act='gelu'), 'hidden_act'),
    (lambda c: c.update(model_type='mistral', architectures=['MistralForCausalLM']), 'model_type'),
    (lambda c: c.update(rope_scaling={'type': 'dynamic', 'factor': 2.0}, rope_parameters=None), 'dynamic'),
    (lambda c: c.update(intermediate_size=65), 'mlp.gate_proj.weight'),
    (lambda c: c.update(dtype='bfloat16', torch_dtype='bfloat16'), 'dtype mismatch'),
    (lambda c: c.pop('num_hidden_layers'), 'num_hidden_layers'),
])
def test_unsupported_or_inconsistent_checkpoints_name_the_problem(edit, fragment, tmp_path):
  make_hf_model('mha_untied', tmp_path / 'hf')
  hf_config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  edit(hf_config)
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps(hf_config))
  with pytest.raises(hf.ConversionError, match=fragment):
    hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'ckpt'))


def test_missing_shard_is_reported(tmp_path):
  make_hf_model('mha_untied', tmp_path / 'hf', shard_size='20KB')
  os.remove(sorted((tmp_path / 'hf').glob('model-*.safetensors'))[1])
  with pytest.raises(hf.ConversionError, match='missing weight shard'):
    hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'ckpt'))


@pytest.mark.slow  # heavy end-to-end run: kept out of the 10-minute default suite (pytest -m slow runs it)
def test_cli_import_then_sample_matches_transformers_greedy(tmp_path):
  texts = ['def add(a, b):\n    return a + b\n', 'class A:\n    pass\n'] * 20
  tok = tokenizer_lib.train_bpe(texts, 300, tmp_path / 'tokenizer.json')
  # Model vocabulary == tokenizer vocabulary, so neither side has ids the other cannot produce.
  model = make_hf_model('gqa_tied_linear_rope', tmp_path / 'hf', vocab_size=tok.vocab_size,
                        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  shutil.copyfile(tmp_path / 'tokenizer.json', tmp_path / 'hf' / 'tokenizer.json')
  run = lambda *args: subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                                     timeout=300)
  result = run('-m', 'dsjax.convert.hf', 'import', str(tmp_path / 'hf'), str(tmp_path / 'ckpt'))
  assert result.returncode == 0, result.stderr
  assert 'config.py' in result.stdout
  result = run('sample.py', f'--checkpoint={tmp_path / "ckpt"}', '--prompt=def add(', '--max_new_tokens=6',
               '--temperature=0', '--dtype=float32')
  assert result.returncode == 0, result.stderr
  prompt = [tok.bos_id] + list(tok.encode('def add('))
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_id,
                         pad_token_id=tok.pad_id)
  # Our sampler masks nothing here (model vocab == tokenizer vocab), so greedy ids must agree exactly.
  assert result.stdout.rstrip('\n') == 'def add(' + tok.decode(out[0, len(prompt):].tolist())
  result = run('sample.py', f'--checkpoint={tmp_path / "ckpt"}', '--prompt=def add(', '--prompt=class A',
               '--max_new_tokens=2', '--dtype=float32')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == '--- sample 1/2 ---' and lines[1].startswith('def add(') and '--- sample 2/2 ---' in lines
  usage = run('sample.py', '--help').stdout  # flags defined by dsjax/cli.py are sample.py's own
  assert all(f'--{name}:' in usage for name in ('quant', 'adapter', 'dtype', 'checkpoint'))
  bad = run('-m', 'dsjax.convert.hf', 'import', str(tmp_path / 'nowhere'), str(tmp_path / 'x'))
  assert bad.returncode == 2 and bad.stderr.startswith('error: ') and 'config.json' in bad.stderr


@pytest.mark.slow  # heavy end-to-end run: kept out of the 10-minute default suite (pytest -m slow runs it)
def test_train_py_starts_from_an_imported_checkpoint(tmp_path):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / 'hf')  # no tokenizer: dsjax's byte one fits
  hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'ckpt'))
  cfg = checkpoint.load_config(str(tmp_path / 'ckpt'))
  saved = checkpoint.load_params(str(tmp_path / 'ckpt'), cfg.model)
  for a, b in zip(jax.tree_util.tree_leaves(start_lib.checkpoint_params(cfg)), jax.tree_util.tree_leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cfg.model.num_layers = 3
  with pytest.raises(ValueError, match='num_layers'):
    start_lib.checkpoint_params(cfg)
  result = subprocess.run(
      [sys.executable, 'train.py', f'--config={tmp_path / "ckpt" / "config.py"}', '--config.train.steps=2',
       '--config.train.batch_size=8', '--config.data.seq_len=32', '--config.data.eval_batches=1',
       '--config.train.num_samples=1', '--config.sample.max_new_tokens=3', '--config.model.dtype=float32',
       f'--config.train.workdir={tmp_path / "continued"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'final held-out loss' in result.stdout
  assert f'initialised from {tmp_path / "ckpt"}' in result.stdout  # a new run from the checkpoint, said so


def test_published_deepseek_coder_config_maps_onto_the_preset():
  """config.json of deepseek-ai/deepseek-coder-1.3b-base as published (transformers 4.33 style)."""
  published = {
      'architectures': ['LlamaForCausalLM'], 'bos_token_id': 32013, 'eos_token_id': 32014, 'hidden_act': 'silu',
      'hidden_size': 2048, 'initializer_range': 0.02, 'intermediate_size': 5504, 'max_position_embeddings': 16384,
      'model_type': 'llama', 'num_attention_heads': 16, 'num_hidden_layers': 24, 'num_key_value_heads': 16,
      'pretraining_tp': 1, 'rms_norm_eps': 1e-06, 'rope_scaling': {'factor': 4.0, 'type': 'linear'},
      'rope_theta': 100000, 'tie_word_embeddings': False, 'torch_dtype': 'bfloat16', 'use_cache': True,
      'vocab_size': 32256}
  from dsjax import config as config_lib
  preset = config_lib.load_config(os.path.join(ROOT, 'configs', 'deepseek_coder_1p3b.py')).model
  mapped = hf.model_config_from_hf(published, preset)
  assert mapped.to_dict() == preset.to_dict()
  assert hf.hf_tensor_names(mapped)[:2] == ['model.embed_tokens.weight', 'model.layers.0.input_layernorm.weight']
  assert len(hf.hf_tensor_names(mapped)) == 2 + 24 * 9 + 1
