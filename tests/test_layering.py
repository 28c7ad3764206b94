"""Imports go one way (DESIGN.md section 2): config -> model -> data / sharding -> checkpoint ->
train | sample | convert -> eval -> retrieval -> serve / experiment -> CLIs.

Parses every module of the package (ast, nothing imported) and fails on an import cycle, on an import from a higher
layer or between peer packages of one layer, and on a function-level import of a dsjax module (deferred imports are
for optional heavy third-party dependencies only, each with a one-line reason after `g-import-not-at-top`).
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'dsjax')

# Lowest first. A module may import from its own unit (the first prefix matching it) and from any unit of a lower
# layer; units of the same layer are peers and do not import each other.
LAYERS = (
    ('dsjax', 'dsjax.config', 'dsjax.hlo', 'dsjax.distributed', 'dsjax.files'),
    ('dsjax.model',),
    ('dsjax.quant',),                                # the quantized weight format
    ('dsjax.lora',),                                 # adapters over the model (its frozen base may be quantized)
    ('dsjax.data', 'dsjax.sharding'),
    ('dsjax.checkpoint',),                           # the artifact format every part reads
    ('dsjax.train', 'dsjax.sample', 'dsjax.convert'),
    ('dsjax.eval',),
    ('dsjax.retrieval',),
    ('dsjax.serve', 'dsjax.experiment'),            # the server; a training run with every hook it asks for
    ('dsjax.cli',),                                  # helpers of the command-line programs
    ('dsjax.ablate', '__main__'),
)
# Top-level modules that belong to a package's unit: the train step's loss wrappers and gradient strategies.
ALIASES = {'dsjax.distill': 'dsjax.train', 'dsjax.privacy': 'dsjax.train'}


def module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-len('.py')].replace(os.sep, '.')
  return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def unit_of(name: str) -> tuple[int, str]:
  """(layer index, unit) of a module name; `__main__` modules are CLIs."""
  if name.endswith('.__main__'):
    return len(LAYERS) - 1, '__main__'
  name = next((unit for alias, unit in ALIASES.items() if name == alias), name)
  for index, units in enumerate(LAYERS):
    for unit in units:
      if name == unit or (unit != 'dsjax' and name.startswith(unit + '.')):
        return index, unit
  raise AssertionError(f'{name}: not in any layer of tests/test_layering.py; add it where it belongs')


def all_modules() -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(folder, f)
        out[module_name(path)] = path
  return out


def imports(path: str, modules: dict[str, str]) -> list[tuple[str, int, bool, str]]:
  """(imported dsjax module, line, at module level, source line) of every import in the file at `path`."""
  with open(path) as f:
    source = f.read()
  lines = source.splitlines()
  tree = ast.parse(source)
  top = {id(node) for node in tree.body}
  for node in tree.body:  # imports under `if TYPE_CHECKING:` / try at module level also count as module level
    if isinstance(node, (ast.If, ast.Try)):
      top.update(id(n) for n in ast.walk(node))
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f'{node.module}.{a.name}' for a in node.names]
      names = [n if n in modules else node.module for n in names]  # `from pkg import module` or a name
    else:
      continue
    for name in names:
      found.append((name, node.lineno, id(node) in top, lines[node.lineno - 1]))
  return found


def test_every_module_has_a_layer():
  for name in all_modules():
    unit_of(name)


def test_imports_go_one_way_and_only_optional_dependencies_are_deferred():
  modules = all_modules()
  problems = []
  for name, path in sorted(modules.items()):
    layer, unit = unit_of(name)
    for target, line, at_top, text in imports(path, modules):
      where = f'{os.path.relpath(path, ROOT)}:{line}'
      if not target.startswith('dsjax'):
        if not at_top and not ('g-import-not-at-top' in text and '(' in text.split('g-import-not-at-top')[-1]):
          problems.append(f'{where}: deferred import of {target} without a reason: {text.strip()}')
        continue
      if not at_top:
        problems.append(f'{where}: function-level import of {target} (only optional heavy dependencies may be '
                        'deferred)')
      target_layer, target_unit = unit_of(target)
      if target_unit == unit or target_layer < layer:
        continue
      kind = 'a peer' if target_layer == layer else 'a higher layer'
      problems.append(f'{where}: {name} ({unit}) imports {target} from {kind} ({target_unit})')
  assert not problems, '\n'.join(problems)


def test_no_import_cycles():
  modules = all_modules()
  graph = {name: sorted({t for t, *_ in imports(path, modules) if t in modules and t != name})
           for name, path in modules.items()}
  # A package's __init__ importing its own submodules is not a cycle through the submodules' `from pkg import x`.
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = 'open'
    for nxt in graph.get(node, ()):
      if state.get(nxt) == 'open':
        cycles.append(' -> '.join(stack[stack.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = 'done'

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])
  assert not cycles, '\n'.join(cycles)


@pytest.mark.parametrize('source, expected', [
    ('from dsjax.train import loop\n', 'dsjax.train.loop'),
    ('def f():\n  from dsjax import checkpoint\n', 'dsjax.checkpoint'),
])
def test_the_parser_sees_module_and_function_level_imports(tmp_path, source, expected):
  path = tmp_path / 'm.py'
  path.write_text(source)
  found = imports(str(path), {'dsjax.train.loop': '', 'dsjax.checkpoint': ''})
  assert [f[0] for f in found] == [expected]
  assert found[0][2] == source.startswith('from')
  assert unit_of('dsjax.eval.perplexity') > unit_of('dsjax.train.loop')
