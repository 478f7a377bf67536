"""The package's imports, read from its source files (nothing is imported, so no jax): no cycle
between modules or between subpackages, imports inside functions included, and the layers point
one way, launch -> experiments -> train -> {inference, evaluation} -> {models, losses, data} ->
the base modules, so that prediction and evaluation never depend on training."""

import ast
import pathlib

import pytest

PACKAGE = 'dualseg_jax'
PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE

# Each subpackage's layer: a module imports from its own layer and the ones below it only. The
# modules directly under dualseg_jax/ (structures, config_base, run_dir, files, ...) are layer 0;
# tools/ (benchmarks and checks beside the method) may use everything and nothing uses them.
LAYERS = {'data': 1, 'models': 1, 'losses': 1, 'inference': 2, 'evaluation': 2, 'train': 3,
          'experiments': 4, 'tools': 5}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _package_modules() -> dict[str, pathlib.Path]:
  return {_module_name(path): path for path in sorted(PACKAGE_ROOT.rglob('*.py'))}


MODULES = _package_modules()


def _known_module(name: str) -> str | None:
  """The package's module that `name` (a module, or a name inside one) belongs to."""
  while name and name not in MODULES:
    name = name.rpartition('.')[0]
  return name or None


def imports_of(module: str) -> set[str]:
  """The package's modules that `module` imports, at its top or inside any function."""
  path = MODULES[module]
  package = module if path.name == '__init__.py' else module.rpartition('.')[0]
  imported = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parents = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(parents + ([node.module] if node.module else []))
      # `from package import submodule` imports the submodule, `from module import name` the module.
      names = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in MODULES else base
               for alias in node.names]
    else:
      continue
    imported.update(known for known in map(_known_module, names) if known not in (None, module))
  return imported


GRAPH = {module: imports_of(module) for module in MODULES}


def _group(module: str) -> str:
  """'dualseg_jax.inference.run' -> 'inference'; a module directly under the package is its own
  group ('structures'), the package's __init__ is 'dualseg_jax'."""
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else parts[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one node (Tarjan): each holds a cycle."""
  index, lowest, stack, on_stack, components = {}, {}, [], set(), []

  def visit(node):
    index[node] = lowest[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for successor in sorted(graph.get(node, ())):
      if successor not in index:
        visit(successor)
        lowest[node] = min(lowest[node], lowest[successor])
      elif successor in on_stack:
        lowest[node] = min(lowest[node], index[successor])
    if lowest[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return components


def _edges_within(component: list[str], graph: dict[str, set[str]]) -> list[str]:
  return [f'{source} -> {target}' for source in component for target in sorted(graph[source])
          if target in component]


def test_the_graph_is_read_from_every_module_including_imports_inside_functions():
  assert len(MODULES) > 40
  # Top-level and function-level imports both count (tests of this test's own reading).
  assert f'{PACKAGE}.inference.predictor' in GRAPH[f'{PACKAGE}.inference.run']
  assert f'{PACKAGE}.errors' in GRAPH[f'{PACKAGE}.structures']
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
  assert _cycles({'a': {'b'}, 'b': set()}) == []


def test_no_module_imports_itself_through_others():
  cycles = _cycles(GRAPH)
  assert not cycles, 'import cycles between modules:\n' + '\n'.join(
      '  ' + ', '.join(edges) for edges in (_edges_within(cycle, GRAPH) for cycle in cycles))


def test_no_cycle_between_subpackages():
  groups: dict[str, set[str]] = {}
  for module, imported in GRAPH.items():
    groups.setdefault(_group(module), set()).update(
        _group(target) for target in imported if _group(target) != _group(module))
  cycles = _cycles(groups)
  assert not cycles, 'import cycles between subpackages (module imports that close them):\n' + '\n'.join(
      f'  {cycle}: ' + ', '.join(f'{source} -> {target}' for source, targets in GRAPH.items()
                                 for target in sorted(targets)
                                 if _group(source) in cycle and _group(target) in cycle
                                 and _group(source) != _group(target))
      for cycle in cycles)


@pytest.mark.parametrize('package', ['inference', 'evaluation'])
def test_prediction_and_evaluation_import_nothing_of_training_or_experiments(package):
  wrong = sorted(f'{module} -> {target}' for module, imported in GRAPH.items()
                 if _group(module) == package for target in imported
                 if _group(target) in ('train', 'experiments', 'tools'))
  assert not wrong, f'{package} depends on training: ' + ', '.join(wrong)


def test_every_module_imports_from_its_own_layer_or_below():
  def layer(module):
    return LAYERS.get(_group(module), 0)

  upward = sorted(f'{module} (layer {layer(module)}) -> {target} (layer {layer(target)})'
                  for module, imported in GRAPH.items() for target in imported
                  if layer(target) > layer(module))
  assert not upward, 'imports against the layers:\n  ' + '\n  '.join(upward)
