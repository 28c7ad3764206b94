"""Ablation runner: one base config, a list of runs (each a few config overrides), trained the same way and compared.

  python -m dsjax.ablate configs/ablations/attention_kinds.py [--workdir=runs/ablate/<study>] [--steps=N]
      [--batch_size=N] [--set=train.eval_every=50 ...] [--only=run,run] [--host_index=i --num_hosts=n] [--resume]

A study file defines `get_study()` returning a `Study` (or a ConfigDict with the same fields): `name`, `base` (a
config, e.g. configs/tiny.py's) and `runs`, an ordered {run_name: {dotted.field: value}} (`grid` builds the cartesian
product of a few fields). Every run starts from the same base, so seeds, data order and held-out batches are shared;
only its overrides differ. Each run trains with dsjax.train.loop.train in <workdir>/<run> and leaves
<workdir>/<run>/result.json; the study's tables and plots (results.csv/.md/.json, loss_curves.png,
bits_per_byte.png, tokens_per_s.png, memory.png) are rewritten from all the results present after every run, so
hosts that split the runs (run i on host i % num_hosts) with a shared workdir all end with the full table.
"""
from __future__ import annotations

import argparse
import ast
import copy
import csv
import dataclasses
import difflib
import itertools
import json
import os
import resource
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections

from dsjax import config as config_lib
from dsjax import eval as eval_lib
from dsjax import experiment
from dsjax.data import pipeline

RESULT_FILE = 'result.json'
SHARED_FIELDS = ('seed', 'data.shuffle_seed')  # identical in every run of a study, so runs are comparable


@dataclasses.dataclass
class Study:
  """An ablation: `runs` = ordered [(run_name, {dotted.field: value})], each applied to a copy of `base`."""
  name: str
  base: ml_collections.ConfigDict
  runs: list[tuple[str, dict[str, Any]]]
  description: str = ''

  def __post_init__(self):
    self.runs = _normalize_runs(self.runs)  # any accepted form -> [(name, {dotted.field: value})]


def grid(axes: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any] | None = None,
         names: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
  """The cartesian product of `axes` ({dotted.field: values}, first axis slowest) as {run_name: overrides}, each run
  also getting the `fixed` overrides. Run names join `<short>-<value>` with '_', where short is `names[field]` or
  the field's last part: grid({'model.attention.window': [32, 64]}) -> {'window-32': {...}, 'window-64': {...}}."""
  names = dict(names or {})
  fields = list(axes)
  runs = {}
  for values in itertools.product(*(axes[f] for f in fields)):
    name = '_'.join(f'{names.get(f, f.rsplit(".", 1)[-1])}-{v}' for f, v in zip(fields, values))
    runs[name] = {**dict(fixed or {}), **dict(zip(fields, values))}
  return runs


def _normalize_runs(runs: Any) -> list[tuple[str, dict[str, Any]]]:
  """{name: overrides}, [(name, overrides)] or [{name: overrides}, ...] -> [(name, overrides)]."""
  if isinstance(runs, (dict, ml_collections.ConfigDict)):
    items = list(runs.items())
  else:
    items = []
    for item in runs:
      if isinstance(item, (dict, ml_collections.ConfigDict)):
        items += list(item.items())
      else:
        name, overrides = item
        items.append((name, overrides))
  out, seen = [], set()
  for name, overrides in items:
    name = str(name)
    if not name or any(c in name for c in '/\\,') or name.startswith('.'):
      raise config_lib.ConfigError(f'run name {name!r}: must be non-empty without "/", "\\" or ","')
    if name in seen:
      raise config_lib.ConfigError(f'run name {name!r} appears twice')
    seen.add(name)
    overrides = overrides.to_dict() if isinstance(overrides, ml_collections.ConfigDict) else dict(overrides)
    out.append((name, _flatten(overrides)))
  if not out:
    raise config_lib.ConfigError('the study has no runs')
  return out


def _flatten(overrides: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'model': {'remat': 'full'}} or {'model.remat': 'full'} -> {'model.remat': 'full'}."""
  flat = {}
  for key, value in overrides.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def as_study(obj: Any) -> Study:
  """A Study from what `get_study()` returned (a Study, a ConfigDict or a dict with name/base/runs)."""
  if isinstance(obj, Study):
    return obj
  get = obj.get if isinstance(obj, (dict, ml_collections.ConfigDict)) else lambda k, d=None: getattr(obj, k, d)
  for key in ('name', 'base', 'runs'):
    if get(key) is None:
      raise config_lib.ConfigError(f'the study has no {key!r} (get_study() must return name, base and runs)')
  return Study(str(get('name')), get('base'), _normalize_runs(get('runs')), str(get('description', '') or ''))


def load_study(path: str) -> Study:
  """`get_study()` of a study file (imported like a config file: `from configs import tiny` works)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'study file not found: {path}')
  module = config_lib.import_config_file(path, module_prefix='_study_')
  if not hasattr(module, 'get_study'):
    raise config_lib.ConfigError(f'{path}: defines no get_study()')
  return as_study(module.get_study())


def _parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
  """['train.steps=5', "model.attention.kind='sparse'"] -> {dotted.field: value} (Python literals, else str)."""
  out = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or not key.strip():
      raise config_lib.ConfigError(f'--set {item!r}: expected dotted.field=value')
    out[key.strip().removeprefix('config.')] = _parse_value(value.strip())
  return out


def apply_overrides(base: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    where: str = 'override') -> ml_collections.ConfigDict:
  """A validated copy of `base` with {dotted.field: value} set. An unknown field or a value of the wrong type
  raises ConfigError naming `config.<field>` (with a close match when there is one) and `where`."""
  cfg = copy.deepcopy(base)
  for key, value in overrides.items():
    node, parts = cfg, key.split('.')
    for depth, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        siblings = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(part, siblings, n=1)
        hint = f' (did you mean {".".join(parts[:depth] + close[:1])!r}?)' if close else ''
        raise config_lib.ConfigError(f'{where}: unknown config field config.{key}{hint}')
      if depth < len(parts) - 1:
        node = node[part]
    if isinstance(value, list):
      value = tuple(value)
    try:
      node[parts[-1]] = value  # existing fields stay assignable in a locked ConfigDict; types are checked
    except (TypeError, ValueError) as e:
      raise config_lib.ConfigError(f'{where}: config.{key}={value!r}: {e}') from e
  try:
    config_lib.validate(cfg)
    pipeline.validate_config(cfg.data)
    eval_lib.check_config(cfg)
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f'{where}: {e}') from e
  return cfg


def _get(cfg: ml_collections.ConfigDict, field: str) -> Any:
  for part in field.split('.'):
    cfg = cfg[part]
  return cfg


def run_configs(study: Study, workdir: str, overrides: Mapping[str, Any] | None = None
                ) -> list[tuple[str, dict[str, Any], ml_collections.ConfigDict]]:
  """Every run's (name, its overrides, full config): base <- `overrides` (runner-wide, e.g. steps) <- the run's own.
  Checks all runs before any trains, so a typo in the last run fails at once."""
  base = apply_overrides(study.base, dict(overrides or {}), where=f'study {study.name!r}, runner overrides')
  shared = {f: _get(base, f) for f in SHARED_FIELDS}
  out = []
  for name, run_overrides in study.runs:
    for field in SHARED_FIELDS:
      if field in run_overrides:
        raise config_lib.ConfigError(f'study {study.name!r}, run {name!r}: config.{field} must be the same in every '
                                     'run (set it in the base)')
    cfg = apply_overrides(base, run_overrides, where=f'study {study.name!r}, run {name!r}')
    cfg.train.workdir = os.path.join(workdir, name)
    assert {f: _get(cfg, f) for f in SHARED_FIELDS} == shared
    out.append((name, run_overrides, cfg))
  return out


def select_runs(names: Sequence[str], only: Sequence[str] = (), host_index: int = 0, num_hosts: int = 1) -> list[str]:
  """The runs this host does: those named in `only` (all when empty; unknown names raise), then of those in study
  order, run i (counting all runs of the study) when i % num_hosts == host_index."""
  if num_hosts < 1 or not 0 <= host_index < num_hosts:
    raise config_lib.ConfigError(f'--host_index={host_index} must be in [0, --num_hosts={num_hosts})')
  unknown = [n for n in only if n not in names]
  if unknown:
    raise config_lib.ConfigError(f'--only: no run named {", ".join(map(repr, unknown))} (runs: {", ".join(names)})')
  return [n for i, n in enumerate(names) if (not only or n in only) and i % num_hosts == host_index]


def peak_memory() -> tuple[float, str]:
  """(bytes, what they measure): the accelerator's peak_bytes_in_use when its backend reports it, else the process's
  peak resident set size (CPU). Both are peaks since the process started, so in-process runs after the first show
  at least the earlier runs' peak (run studies with --only per process for exact per-run numbers)."""
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (backends without memory stats raise or return None)
    stats = {}
  if 'peak_bytes_in_use' in stats:
    return float(stats['peak_bytes_in_use']), f'device peak_bytes_in_use ({jax.devices()[0].device_kind})'
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return float(rss if sys.platform == 'darwin' else rss * 1024), 'process max RSS (CPU; getrusage)'


def run_one(name: str, overrides: Mapping[str, Any], cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Trains one run and returns its record (also written to <run workdir>/result.json)."""
  start = time.time()
  summary = experiment.train(cfg)
  wall = time.time() - start
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  history = summary['history']
  rates = [h['tokens_per_sec'] for h in history[1:]] or [h['tokens_per_sec'] for h in history]  # 1st: compile
  memory, memory_source = peak_memory()
  final = summary['final_eval'] or {}
  record = {
      'run': name, 'overrides': dict(overrides),
      'attention': cfg.model.attention.kind, 'positions': cfg.model.positions.kind,
      'num_params': int(summary['num_params']), 'steps': int(cfg.train.steps), 'tokens': cfg.train.steps *
      tokens_per_step, 'final_loss': final.get('loss'), 'final_bits_per_byte': final.get('bits_per_byte'),
      'unigram_bits_per_byte': (summary['unigram'] or {}).get('bits_per_byte'),
      'tokens_per_s': float(sorted(rates)[len(rates) // 2]) if rates else None,
      'peak_memory_bytes': memory, 'memory_source': memory_source, 'wall_s': wall,
      'train_s': float(summary['train_seconds']),
      'train_curve': [{'step': h['step'], 'tokens': h['step'] * tokens_per_step, 'loss': h['loss']} for h in history],
      'eval_curve': [{'step': e['step'], 'tokens': e['step'] * tokens_per_step, 'loss': e['loss'],
                      'bits_per_byte': e['bits_per_byte']} for e in summary['evals']],
  }
  if summary.get('eval_tasks'):
    record['eval_tasks'] = summary['eval_tasks']
  with open(os.path.join(cfg.train.workdir, RESULT_FILE), 'w') as f:
    json.dump(_plain(record), f, indent=2)
  return record


def _plain(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if hasattr(value, 'item') and not isinstance(value, (str, bytes)):
    return value.item()
  return value


def load_results(study: Study, workdir: str) -> list[dict[str, Any]]:
  """The records of the study's runs that have a result.json in `workdir`, in study order."""
  out = []
  for name, _ in study.runs:
    path = os.path.join(workdir, name, RESULT_FILE)
    if os.path.isfile(path):
      with open(path) as f:
        out.append(json.load(f))
  return out


CSV_COLUMNS = ('run', 'overrides', 'attention', 'positions', 'num_params', 'steps', 'tokens', 'final_loss',
               'final_bits_per_byte', 'unigram_bits_per_byte', 'tokens_per_s', 'peak_memory_bytes', 'memory_source',
               'wall_s', 'train_s')


def _fmt(value: Any, digits: int = 4) -> str:
  if value is None:
    return '-'
  if isinstance(value, float):
    return f'{value:.{digits}f}'
  return str(value)


def _steps_line(study: Study, records: list[dict[str, Any]]) -> str:
  """The steps the runs actually trained for (their configs, overrides included), e.g. with `--steps=20`, and the
  base config's count when that differs (the study's description is written for the base)."""
  steps = sorted({int(r['steps']) for r in records})
  base = int(study.base.train.steps)
  line = f'**Steps run: {" / ".join(map(str, steps))}** per run'
  if steps != [base]:
    line += f' (overridden: the study\'s base config and description are for train.steps={base})'
  return line + '.'


def write_tables(study: Study, records: list[dict[str, Any]], workdir: str) -> dict[str, str]:
  """results.csv, results.md and results.json in `workdir`; returns {kind: path}."""
  os.makedirs(workdir, exist_ok=True)
  paths = {k: os.path.join(workdir, f'results.{k}') for k in ('csv', 'md', 'json')}
  with open(paths['csv'], 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for r in records:
      writer.writerow([json.dumps(r['overrides'], sort_keys=True) if c == 'overrides' else r.get(c)
                       for c in CSV_COLUMNS])
  missing = [n for n, _ in study.runs if n not in {r['run'] for r in records}]
  lines = [f'# Ablation study: {study.name}', '']
  if study.description:
    lines += [study.description, '']
  if records:
    lines += [_steps_line(study, records), '']
  lines += ['| run | overrides | params | steps | tokens | held-out loss | bits/byte | tokens/s | peak memory (MiB) | '
            'wall (s) |', '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in records:
    overrides = ', '.join(f'`{k}={v!r}`' for k, v in r['overrides'].items()) or '(base)'
    lines.append(f'| {r["run"]} | {overrides} | {r["num_params"]:,} | {r["steps"]} | {r["tokens"]:,} | '
                 f'{_fmt(r["final_loss"])} | {_fmt(r["final_bits_per_byte"])} | {_fmt(r["tokens_per_s"], 0)} | '
                 f'{_fmt(r["peak_memory_bytes"] / 2**20, 1)} | {_fmt(r["wall_s"], 1)} |')
  sources = sorted({r['memory_source'] for r in records})
  lines += ['', f'Peak memory: {"; ".join(sources) or "-"}; a peak since the process started (runs sharing a process '
            'show at least the earlier runs\' peak). tokens/s: median over logged steps after the first.']
  if missing:
    lines += ['', f'Not run yet: {", ".join(missing)}.']
  with open(paths['md'], 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(paths['json'], 'w') as f:
    json.dump({'study': study.name, 'description': study.description, 'runs': records, 'missing': missing}, f,
              indent=2)
  return paths


def write_plots(records: list[dict[str, Any]], workdir: str) -> dict[str, str]:
  """loss_curves.png, bits_per_byte.png (both vs tokens seen), tokens_per_s.png and memory.png (bars)."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (optional: plots only)
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top  (optional: plots only)
  paths = {}

  def save(fig, name):
    path = os.path.join(workdir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths[name] = path

  for name, key, curve, ylabel in (('loss_curves.png', 'loss', 'train_curve', 'train loss (nats/token)'),
                                   ('bits_per_byte.png', 'bits_per_byte', 'eval_curve', 'held-out bits per byte')):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in records:
      points = r[curve]
      ax.plot([p['tokens'] for p in points], [p[key] for p in points], marker='o' if len(points) < 20 else None,
              label=r['run'])
    ax.set_xlabel('tokens seen')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if records:
      ax.legend(fontsize=8)
    save(fig, name)
  for name, key, scale, ylabel in (('tokens_per_s.png', 'tokens_per_s', 1.0, 'training tokens/s'),
                                   ('memory.png', 'peak_memory_bytes', 2.0**-20, 'peak memory (MiB)')):
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(records) + 2), 4))
    ax.bar([r['run'] for r in records], [(r[key] or 0.0) * scale for r in records], color='tab:blue')
    ax.set_ylabel(ylabel)
    ax.tick_params(axis='x', labelrotation=30)
    ax.grid(axis='y', alpha=0.3)
    save(fig, name)
  return paths


def run_study(study: Study, workdir: str, *, overrides: Mapping[str, Any] | None = None, only: Sequence[str] = (),
              host_index: int = 0, num_hosts: int = 1, resume: bool = False, num_samples: int = 0) -> dict[str, Any]:
  """Runs this host's share of the study (skipping, with `resume`, runs that already have a result) and writes the
  tables and plots from every result present. Returns {'ran', 'skipped', 'records', 'files'}.

  `overrides` apply to every run (e.g. {'train.steps': 5}); end-of-run samples are off unless `num_samples`."""
  overrides = {'train.num_samples': num_samples, **dict(overrides or {})}
  configs = run_configs(study, workdir, overrides)
  selected = set(select_runs([n for n, _, _ in configs], only, host_index, num_hosts))
  ran, skipped = [], []
  for name, run_overrides, cfg in configs:
    if name not in selected:
      continue
    if resume and os.path.isfile(os.path.join(workdir, name, RESULT_FILE)):
      skipped.append(name)
      print(f'[{study.name}] {name}: result exists, skipped (--resume)')
      continue
    print(f'[{study.name}] {name}: {json.dumps(run_overrides, sort_keys=True) or "(base)"}')
    record = run_one(name, run_overrides, cfg)
    ran.append(name)
    print(f'[{study.name}] {name}: held-out {_fmt(record["final_bits_per_byte"])} bits/byte, '
          f'{_fmt(record["tokens_per_s"], 0)} tokens/s, {record["wall_s"]:.1f} s')
    records = load_results(study, workdir)  # after every run, so a stopped study still has its table
    write_tables(study, records, workdir)
  records = load_results(study, workdir)
  files = {**write_tables(study, records, workdir), **write_plots(records, workdir)}
  return {'ran': ran, 'skipped': skipped, 'records': records, 'files': files}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m dsjax.ablate', description=__doc__.split('\n\n')[0])
  parser.add_argument('study', help='a study file defining get_study(), e.g. configs/ablations/attention_kinds.py')
  parser.add_argument('--workdir', default='', help='default: runs/ablate/<study name>')
  parser.add_argument('--steps', type=int, default=0, help='train.steps of every run (0: the study\'s)')
  parser.add_argument('--batch_size', type=int, default=0, help='train.batch_size of every run (0: the study\'s)')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='any config field for every run, e.g. --set=data.seq_len=64 (repeatable)')
  parser.add_argument('--only', default='', help='comma-separated run names to do (default: all)')
  parser.add_argument('--host_index', type=int, default=0, help='this host; it does runs i with i %% num_hosts == it')
  parser.add_argument('--num_hosts', type=int, default=1)
  parser.add_argument('--resume', action='store_true', help='skip runs whose result.json exists')
  parser.add_argument('--num_samples', type=int, default=0, help='completions printed at the end of each run')
  args = parser.parse_args(argv)
  try:
    study = load_study(args.study)
    overrides = parse_sets(args.set)
    if args.steps:
      overrides['train.steps'] = args.steps
    if args.batch_size:
      overrides['train.batch_size'] = args.batch_size
    workdir = args.workdir or os.path.join('runs', 'ablate', study.name)
    only = [n.strip() for n in args.only.split(',') if n.strip()]
    result = run_study(study, workdir, overrides=overrides, only=only, host_index=args.host_index,
                       num_hosts=args.num_hosts, resume=args.resume, num_samples=args.num_samples)
  except (config_lib.ConfigError, FileNotFoundError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  print(f'[{study.name}] ran {len(result["ran"])}, skipped {len(result["skipped"])}; '
        f'{len(result["records"])}/{len(study.runs)} results in {os.path.abspath(workdir)} '
        '(results.md, results.csv, results.json, *.png)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
