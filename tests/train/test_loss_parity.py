"""Per-step training losses against the ones recorded from main before the train step and loop were restructured
(issue 20): a plain run of the tiny config, and a LoRA (int8 base), a distillation, a DP-SGD and an accumulation run
of a few steps each. The restructuring must not change the math: the losses agree to 1e-6.

`python -m tests.train.test_loss_parity` re-records golden_losses.json (only ever from a commit known to be right).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dsjax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden_losses.json')
FEW_STEPS = 4


def _config(workdir: str, tiny: bool = False):
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  if not tiny:
    m = cfg.model
    m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 64, 2, 4, 2, 160
    cfg.data.seq_len = 64
    cfg.data.eval_batches = 1
    cfg.train.steps = FEW_STEPS
    cfg.optim.warmup_steps = 2
  else:
    cfg.train.steps = 30
  cfg.train.log_every = 1
  cfg.train.eval_every = 1000
  cfg.train.progress_bar = False
  cfg.train.num_samples = 0
  cfg.train.tensorboard = False
  cfg.train.workdir = workdir
  return cfg


def _losses(cfg) -> list[float]:
  from dsjax.train import loop  # pylint: disable=g-import-not-at-top
  summary = loop.train(cfg)
  return [float(r['loss']) for r in summary['history']]


def run(kind: str, tmp: str) -> list[float]:
  """The per-step losses of the run `kind` (workdirs under `tmp`)."""
  if kind == 'tiny':
    return _losses(_config(os.path.join(tmp, 'tiny'), tiny=True))
  cfg = _config(os.path.join(tmp, kind))
  if kind == 'lora':
    teacher = _config(os.path.join(tmp, 'base'))
    teacher.train.steps = 2
    _losses(teacher)
    cfg.train.init_from = os.path.join(tmp, 'base', 'checkpoint')
    cfg.lora.enabled, cfg.lora.rank, cfg.lora.base_int8, cfg.lora.dropout = True, 4, True, 0.1
    cfg.lora.targets = ('q_proj', 'v_proj', 'down_proj')
    cfg.optim.learning_rate = 1e-2
  elif kind == 'distill':
    teacher = _config(os.path.join(tmp, 'teacher'))
    teacher.train.steps = 3
    _losses(teacher)
    cfg.distill.teacher = os.path.join(tmp, 'teacher', 'checkpoint')
    cfg.distill.top_k = 16
    cfg.distill.kl_weight, cfg.distill.hard_weight = 0.7, 0.3
    cfg.model.dropout_rate = 0.1
  elif kind == 'dp':
    cfg.privacy.enabled = True
    cfg.privacy.noise_multiplier = 0.5
    cfg.train.grad_accum_steps = 2
  elif kind == 'accum':
    cfg.train.grad_accum_steps = 4
    cfg.train.z_loss_weight = 1e-3
  elif kind == 'routed':
    cfg.model.attention.kind = 'routed'
    cfg.train.grad_accum_steps = 2
  else:
    raise ValueError(kind)
  return _losses(cfg)


KINDS = ('lora', 'distill', 'dp', 'accum', 'routed')


def _golden():
  with open(GOLDEN) as f:
    return json.load(f)


def run_on_one_device(kind: str, tmp: str) -> list[float]:
  """`run` in a fresh process on one CPU device, as the losses were recorded (the test session has 8)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run([sys.executable, '-m', 'tests.train.test_loss_parity', '--print', kind, tmp], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


# lora, distill and dp take 27-36 s each on 2 cores (a fresh process, a teacher or base run first); each feature has
# its own default tests against references (test_lora.py, test_distill.py, test_privacy.py), so they run with -m slow.
SLOW_KINDS = ('lora', 'distill', 'dp')


@pytest.mark.parametrize('kind', [pytest.param(k, marks=pytest.mark.slow) if k in SLOW_KINDS else k for k in KINDS])
def test_few_step_losses_match_main(kind, tmp_path):
  expected = _golden()[kind]
  got = run_on_one_device(kind, str(tmp_path))
  assert len(got) == len(expected) == FEW_STEPS
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_tiny_thirty_step_losses_match_main(tmp_path):
  expected = _golden()['tiny']
  got = run_on_one_device('tiny', str(tmp_path))
  assert len(got) == len(expected) == 30
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


if __name__ == '__main__':
  import tempfile  # pylint: disable=g-import-not-at-top
  if sys.argv[1] == '--print':
    print(json.dumps(run(sys.argv[2], sys.argv[3])))
    sys.exit(0)
  kinds = sys.argv[1:] or ('tiny',) + KINDS
  record = _golden() if os.path.exists(GOLDEN) else {}
  with tempfile.TemporaryDirectory() as tmp:
    for kind in kinds:
      record[kind] = run(kind, tmp)
      print(kind, record[kind], flush=True)
  with open(GOLDEN, 'w') as f:
    json.dump(record, f, indent=1)
