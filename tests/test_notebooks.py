"""The Colab notebooks (colab/*.ipynb) execute on CPU in smoke mode (DSJAX_NOTEBOOK_SMOKE=1) without errors.

Each runs with nbclient in a fresh kernel of this interpreter, in colab/ (as when opened from a checkout), with
one CPU device (no fake devices from conftest) and tiny settings; a few printed results are checked.
"""
import math
import os
import re
import subprocess
import sys

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, 'colab')
NOTEBOOKS = ('quickstart', 'kernels', 'serving', 'ablation')


def kernel_env() -> dict[str, str]:
  env = dict(os.environ)
  env.update(DSJAX_NOTEBOOK_SMOKE='1', JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', env.get('XLA_FLAGS', '')).strip()
  if flags:
    env['XLA_FLAGS'] = flags
  else:
    env.pop('XLA_FLAGS', None)
  env.pop('DSJAX_REPO', None)
  env.pop('COLAB_TPU_ADDR', None)
  env.pop('TPU_NAME', None)
  return env


def run_notebook(name: str, timeout: int = 120) -> tuple[str, list[dict]]:
  """Executes colab/<name>.ipynb; returns all its text output (stdout, stderr, text/plain and markdown) and the
  outputs themselves."""
  nb = nbformat.read(os.path.join(COLAB, f'{name}.ipynb'), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name='python3', allow_errors=False,
                                   resources={'metadata': {'path': COLAB}})
  # jupyter_client starts kernelspecs whose argv begins with 'python' with sys.executable (this venv's python).
  client.execute(env=kernel_env())
  outputs = [output for cell in nb.cells for output in cell.get('outputs', [])]
  texts = []
  for output in outputs:
    if output.get('output_type') == 'stream':
      texts.append(output['text'])
    elif 'data' in output:
      texts.extend(output['data'].get(kind, '') for kind in ('text/plain', 'text/markdown'))
  return '\n'.join(texts), outputs


def check_install_cell(text: str) -> None:
  assert f'python: {sys.executable}' in text  # the kernel ran this interpreter
  assert 'accelerator: cpu' in text and 'CpuDevice' in text


def test_notebooks_are_built_from_the_generator():
  result = subprocess.run([sys.executable, os.path.join(COLAB, 'build_notebooks.py'), '--check'],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
  for name in NOTEBOOKS:
    nb = nbformat.read(os.path.join(COLAB, f'{name}.ipynb'), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert 'google.colab' in code[0].source and 'jax[tpu]' in code[0].source
    assert any('parameters' in c.metadata.get('tags', []) for c in code)
    assert all(not c.outputs and c.execution_count is None for c in code)  # committed without outputs


@pytest.mark.slow  # heavy end-to-end run: kept out of the 10-minute default suite (pytest -m slow runs it)
def test_quickstart():
  text, outputs = run_notebook('quickstart')
  check_install_cell(text)
  loss = float(re.search(r'final train loss: (\S+)', text).group(1))
  assert math.isfinite(loss) and loss < 7.0
  assert 'bits/byte' in text
  assert text.count('--- sample (') == 3
  assert any('image/png' in o.get('data', {}) for o in outputs)  # the loss curve


@pytest.mark.slow  # 17 s on 2 cores (2026-12-02): tests/pallas_kernels covers the same comparisons
def test_kernels():
  text, _ = run_notebook('kernels')
  check_install_cell(text)
  assert 'Pallas interpret mode' in text
  error = float(re.search(r'max abs error \(fp32\) over outputs and gradients: (\S+)', text).group(1))
  assert error < 1e-4
  assert re.search(r'128 +32 +kernel +[\d.]+ +[\d.]+', text) and re.search(r'128 +None +reference', text)


@pytest.mark.slow  # heavy end-to-end run: kept out of the 10-minute default suite (pytest -m slow runs it)
def test_serving():
  text, _ = run_notebook('serving')
  check_install_cell(text)
  assert "models: ['tiny']" in text
  assert 'streamed completion matches: True' in text and 'streamed chat matches: True' in text
  assert 'the server answered' in text and 'server stopped: True' in text


@pytest.mark.slow
def test_ablation():
  text, outputs = run_notebook('ablation', timeout=300)
  check_install_cell(text)
  assert '[attention_kinds] ran 2, skipped 0' in text  # dsjax.ablate's output, streamed into the notebook
  assert '| full |' in text and '| sparse |' in text  # results.md, displayed as markdown
  assert 'loss_curves.png' in text and 'not written' not in text
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 4  # the four plots
