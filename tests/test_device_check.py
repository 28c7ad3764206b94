"""bench/device_check.py on a machine without an accelerator: its help, the step list of a dry run (summary.md and
summary.json written), a rejected step name, and the one-line headlines it reads from benchmark JSON."""
import json
import os
import subprocess
import sys

from bench import device_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'bench', 'device_check.py')


def test_help_and_dry_run(tmp_path):
  help_text = subprocess.run([sys.executable, SCRIPT, '--help'], capture_output=True, text=True, check=True).stdout
  for step in ('tests', 'attention', 'sweep', 'decode', 'train'):
    assert step in help_text
  subprocess.run([sys.executable, SCRIPT, f'--out={tmp_path}', '--dry_run'], capture_output=True, check=True)
  summary = (tmp_path / 'summary.md').read_text()
  assert [line.split('|')[1].strip() for line in summary.splitlines() if line.startswith('| ') and
          'step' not in line] == ['tests', 'attention', 'sweep', 'decode', 'train']
  records = json.loads((tmp_path / 'summary.json').read_text())
  assert all('--out=' in r['command'] or 'junitxml' in r['command'] for r in records)


def test_unknown_step_is_a_usage_error(tmp_path):
  done = subprocess.run([sys.executable, SCRIPT, f'--out={tmp_path}', '--only=tests,bogus'], capture_output=True,
                        text=True, check=False)
  assert done.returncode == 2 and 'bogus' in done.stderr


def test_headlines_read_the_benchmark_json():
  ratios = [dict(shape='1x16x32768', window='1024', impl='pallas', vs='cudnn', fwd_ratio=1.5, fwd_bwd_ratio=2.0),
            dict(shape='1x16x32768', window='1024', impl='xla', vs='cudnn', fwd_ratio=9.0, fwd_bwd_ratio=9.0)]
  line = device_check.headline('attention', {'rows': [], 'ratios': ratios}, '')
  assert 'pallas / cudnn 1x16x32768 w=1024: fwd 1.50, fwd+bwd 2.00' in line and 'xla' not in line
  decode = {'rows': [dict(case='full 4k', pallas_GBps=3000.0, fraction_of_copy=0.75, copy_GBps=4000.0)]}
  assert device_check.headline('decode', decode, '') == 'full 4k: 3000 GB/s = 75% of copy (4000 GB/s)'
  assert device_check.headline('train', None, '') == 'no results (see the log)'
