"""dsjax.ablate: a 2-run study of a few steps writes its tables and plots with the right rows; bad override keys
fail naming the key; --only and host splitting pick the right runs; --resume skips finished runs."""
import csv
import json
import math
import os

import numpy as np
import pytest

from dsjax import ablate
from dsjax import config as config_lib
from dsjax.eval import perplexity
from dsjax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# batch 8: the tests' 8 fake CPU devices (tests/conftest.py) each take one row.
SMALL = {'model.hidden_size': 32, 'model.num_layers': 1, 'model.num_heads': 2, 'model.num_kv_heads': 2,
         'model.mlp_dim': 64, 'data.seq_len': 32, 'data.eval_batches': 1, 'train.batch_size': 8, 'train.steps': 4,
         'train.log_every': 1, 'train.eval_every': 2, 'train.progress_bar': False, 'train.tensorboard': False,
         'train.checkpoint_every': 0}


def tiny_study():
  base = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  return ablate.Study(name='t', base=base, runs=[('full', {'model.attention.kind': 'full'}),
                                                 ('sparse', {'model': {'attention': {'kind': 'sparse', 'window': 8}},
                                                             'eval.tasks': ('perplexity',)})])


def test_grid_is_the_cartesian_product_in_order():
  runs = ablate.grid({'model.attention.window': [8, 16], 'model.attention.num_global': [0, 4]},
                     fixed={'model.attention.kind': 'sparse'}, names={'model.attention.num_global': 'g'})
  assert list(runs) == ['window-8_g-0', 'window-8_g-4', 'window-16_g-0', 'window-16_g-4']
  assert runs['window-16_g-0'] == {'model.attention.kind': 'sparse', 'model.attention.window': 16,
                                   'model.attention.num_global': 0}


@pytest.mark.slow  # heavy end-to-end run: kept out of the 10-minute default suite (pytest -m slow runs it)
def test_two_run_study_writes_tables_and_plots(tmp_path):
  study = tiny_study()
  workdir = str(tmp_path / 'study')
  out = ablate.run_study(study, workdir, overrides=SMALL)
  assert out['ran'] == ['full', 'sparse']
  with open(os.path.join(workdir, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [r['run'] for r in rows] == ['full', 'sparse'] and [r['attention'] for r in rows] == ['full', 'sparse']
  assert json.loads(rows[1]['overrides']) == {'model.attention.kind': 'sparse', 'model.attention.window': 8,
                                              'eval.tasks': ['perplexity']}
  md = open(os.path.join(workdir, 'results.md')).read()
  assert md.count('\n| full |') == 1 and md.count('\n| sparse |') == 1 and 'Not run yet' not in md
  assert '**Steps run: 4** per run (overridden' in md and 'train.steps=400' in md
  data = json.load(open(os.path.join(workdir, 'results.json')))
  assert data['study'] == 't' and [r['run'] for r in data['runs']] == ['full', 'sparse'] and data['missing'] == []
  for name in ('loss_curves.png', 'bits_per_byte.png', 'tokens_per_s.png', 'memory.png'):
    with open(os.path.join(workdir, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', name
  for record in data['runs']:
    run_dir = os.path.join(workdir, record['run'])
    assert record['steps'] == 4 and record['tokens'] == 4 * 8 * 32
    assert [p['step'] for p in record['train_curve']] == [1, 2, 3, 4]
    assert [(p['step'], p['tokens']) for p in record['eval_curve']] == [(2, 512), (4, 1024)]
    assert record['peak_memory_bytes'] > 0 and record['tokens_per_s'] > 0 and record['wall_s'] > 0
    # The final numbers are those the run logged, and an independent re-evaluation of the saved model agrees.
    logged = [json.loads(line) for line in open(os.path.join(run_dir, 'metrics.jsonl'))]
    last_eval = [r for r in logged if r['split'] == 'validation'][-1]
    assert record['final_loss'] == pytest.approx(last_eval['loss'])
    cfg = checkpoint.load_config(os.path.join(run_dir, 'checkpoint'))
    assert cfg.model.attention.kind == record['attention'] and cfg.seed == study.base.seed
    again = perplexity.evaluate(cfg, checkpoint.load_params(os.path.join(run_dir, 'checkpoint'), cfg.model))
    assert again['loss'] == pytest.approx(record['final_loss'], rel=1e-4)
    # Byte tokenizer: one byte per target except eos, so bits/byte is a little above nats/token / ln 2.
    assert record['final_bits_per_byte'] == pytest.approx(record['final_loss'] / math.log(2), rel=0.05)
  # The end-of-run eval hook (eval.tasks, sparse run only) re-evaluates the same held-out batches.
  assert 'eval_tasks' not in data['runs'][0]
  assert data['runs'][1]['eval_tasks']['perplexity']['loss'] == pytest.approx(data['runs'][1]['final_loss'], rel=1e-5)
  # Same data order and held-out batches: the unigram baseline (a function of the data alone) is identical.
  assert data['runs'][0]['unigram_bits_per_byte'] == data['runs'][1]['unigram_bits_per_byte']
  assert data['runs'][0]['num_params'] == data['runs'][1]['num_params']

  again = ablate.run_study(study, workdir, overrides=SMALL, resume=True)
  assert again['ran'] == [] and again['skipped'] == ['full', 'sparse'] and len(again['records']) == 2


def test_results_md_states_the_steps_run_not_the_study_default(tmp_path):
  """`--steps=20` on a study whose base and description say 300: results.md says 20 were run."""
  study = tiny_study()
  study.base.train.steps, study.description = 300, 'Attention kinds at tiny scale, 300 steps.'
  configs = ablate.run_configs(study, str(tmp_path), {'train.steps': 20})
  record = {'overrides': {}, 'num_params': 1000, 'tokens': 20 * 8 * 256, 'final_loss': 2.0,
            'final_bits_per_byte': 3.0, 'tokens_per_s': 100.0, 'peak_memory_bytes': 2.0**20, 'memory_source': 'rss',
            'wall_s': 1.0}
  records = [{**record, 'run': name, 'steps': cfg.train.steps} for name, _, cfg in configs]
  md = open(ablate.write_tables(study, records, str(tmp_path))['md']).read()
  assert '**Steps run: 20** per run (overridden: the study\'s base config and description are for ' \
         'train.steps=300).' in md
  assert md.count('| 20 | 40,960 |') == 2  # the table's steps and tokens columns
  records = [{**r, 'steps': 300} for r in records]
  md = open(ablate.write_tables(study, records, str(tmp_path))['md']).read()
  assert '**Steps run: 300** per run.' in md and 'overridden' not in md


def test_bad_override_key_names_it(tmp_path, capsys):
  study = tiny_study()
  study.runs.append(('typo', {'model.attention.windw': 8}))
  with pytest.raises(config_lib.ConfigError, match=r"run 'typo'.*config\.model\.attention\.windw.*"
                     r"did you mean 'model\.attention\.window'"):
    ablate.run_configs(study, str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match=r"run 'bad'.*config\.model\.attention\.kind='dense'"):
    ablate.run_configs(ablate.Study('s', study.base, [('bad', {'model.attention.kind': 'dense'})]), str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match=r"config\.eval\.tasks=\('bleu',\).*unknown eval task"):
    ablate.run_configs(ablate.Study('s', study.base, [('bleu', {'eval.tasks': ('bleu',)})]), str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match=r'config\.seed must be the same'):
    ablate.run_configs(ablate.Study('s', study.base, [('seeded', {'seed': 3})]), str(tmp_path))
  study_file = tmp_path / 'study.py'
  study_file.write_text('from dsjax import ablate\nfrom configs import tiny\n\n\ndef get_study():\n'
                        "  return ablate.Study('s', tiny.get_config(), [('a', {}), ('b', {'train.stepz': 2})])\n")
  assert ablate.main([str(study_file), f'--workdir={tmp_path / "w"}']) == 2
  err = capsys.readouterr().err
  assert "run 'b'" in err and 'config.train.stepz' in err and "did you mean 'train.steps'" in err
  assert ablate.main([str(study_file), '--set=model.hiden_size=8']) == 2
  assert 'config.model.hiden_size' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'w')  # nothing ran


def test_only_and_host_split_pick_runs():
  names = ['a', 'b', 'c', 'd', 'e']
  assert ablate.select_runs(names) == names
  assert ablate.select_runs(names, host_index=0, num_hosts=2) == ['a', 'c', 'e']
  assert ablate.select_runs(names, host_index=1, num_hosts=2) == ['b', 'd']
  assert ablate.select_runs(names, only=['e', 'b']) == ['b', 'e']
  assert ablate.select_runs(names, only=['b', 'c', 'e'], host_index=0, num_hosts=3) == []
  assert ablate.select_runs(names, only=['b', 'c', 'e'], host_index=2, num_hosts=3) == ['c']
  with pytest.raises(config_lib.ConfigError, match="no run named 'z'"):
    ablate.select_runs(names, only=['z'])
  with pytest.raises(config_lib.ConfigError, match='host_index'):
    ablate.select_runs(names, host_index=2, num_hosts=2)


def test_shipped_studies_load_and_validate(tmp_path):
  expected = {'attention_kinds': 4, 'sparse_window': 9, 'routing_k': 6, 'positions': 4, 'moe': 5}
  for name, count in expected.items():
    path = os.path.join(ROOT, 'configs', 'ablations', f'{name}.py')
    study = ablate.load_study(path)
    configs = ablate.run_configs(study, str(tmp_path))
    assert study.name == name and len(configs) == count
    assert all(cfg.train.steps == 300 and cfg.model.hidden_size == 256 for _, _, cfg in configs)
    config_lib.load_config(path)  # get_config() still works for train.py


def test_moe_study_runs_and_each_balance_mode_does_its_job(tmp_path):
  """configs/ablations/moe.py: the dense run and the MoE runs have equal active parameters; at the smallest settings
  (2 layers: one dense, one MoE) the correction-bias and balance-loss runs train, the bias moves by the update rate
  only where it is on, and only the aux-loss run's loss carries the balance term."""
  study = ablate.load_study(os.path.join(ROOT, 'configs', 'ablations', 'moe.py'))
  configs = {name: cfg for name, _, cfg in ablate.run_configs(study, str(tmp_path))}
  mo = configs['moe-8_bias'].model.moe
  assert (mo.top_k + mo.num_shared_experts) * mo.expert_dim == configs['dense'].model.mlp_dim
  assert configs['dense'].model.moe.num_experts == 0 and configs['moe-16_bias'].model.moe.num_experts == 16

  workdir = str(tmp_path / 'study')
  small = {**SMALL, 'model.num_layers': 2, 'model.moe.expert_dim': 16}
  out = ablate.run_study(study, workdir, overrides=small, only=['moe-8_bias', 'moe-8_aux'])
  assert out['ran'] == ['moe-8_bias', 'moe-8_aux']
  for record in out['records']:
    run_dir = os.path.join(workdir, record['run'])
    assert math.isfinite(record['final_loss']) and record['steps'] == 4
    train = [r for r in map(json.loads, open(os.path.join(run_dir, 'metrics.jsonl'))) if r['split'] == 'train']
    assert all(r['expert_imbalance'] >= 1.0 for r in train)
    aux = record['run'].endswith('aux')
    assert all((r['moe_balance_loss'] > 0) == aux for r in train)  # ~1 when balanced; not computed at weight 0
    path = os.path.join(run_dir, 'checkpoint')
    bias = np.asarray(checkpoint.load_params(path, checkpoint.load_config(path).model)
                      ['layers']['mlp']['gate']['e_score_correction_bias'])
    if aux:
      assert not bias.any()  # bias_update_rate 0: frozen at its init
    else:  # +-rate per step (0 only for an expert exactly at the mean load)
      assert bias.any() and np.abs(bias).max() <= 4 * 0.001 + 1e-7
