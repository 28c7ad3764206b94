"""A checkpoint's config.json written before a field existed loads with that field's default."""
import json
import os

from dsjax import config as config_lib
from dsjax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_old_checkpoint_config_gets_new_defaults(tmp_path):
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  saved = json.loads(cfg.to_json())
  del saved['sample']['top_p'], saved['train']['grad_accum_steps']
  saved['model']['hidden_size'] = 128
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  loaded = checkpoint.load_config(str(tmp_path))
  assert loaded.sample.top_p == 1.0 and loaded.train.grad_accum_steps == 1  # defaults of configs/base.py
  assert loaded.model.hidden_size == 128 and loaded.model.num_layers == cfg.model.num_layers  # saved values
  assert loaded.mesh.rules == cfg.mesh.rules  # JSON lists come back as tuples
