"""The package's layering (../shared/DESIGN.md): no import cycles among vaebm_jax's modules, models and
sampling know nothing of training, workdir loading sits below the loops, and both stage loops share
`loop.py`. Read from the source (ast), so it sees imports inside functions too."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vaebm_jax")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
  return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _graph() -> dict[str, set[str]]:
  modules = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        modules[_module_name(os.path.join(root, f))] = os.path.join(root, f)
  graph = {}
  for name, path in modules.items():
    deps = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        base = node.module
        if node.level:                                  # relative imports
          base = ".".join(name.split(".")[: -node.level] + [node.module])
        targets = [base] + [f"{base}.{a.name}" for a in node.names]
      else:
        continue
      deps |= {t for t in targets if t in modules and t != name}
    graph[name] = deps
  return graph


def _reachable(graph, start):
  seen, todo = set(), [start]
  while todo:
    for dep in graph[todo.pop()]:
      if dep not in seen:
        seen.add(dep)
        todo.append(dep)
  return seen


def test_no_import_cycles():
  graph = _graph()
  # A package's __init__ re-exporting its submodules is not a cycle of the code's layers.
  edges = {m: {d for d in deps if not (m.startswith(d + ".") and graph.get(d) is not None)}
           for m, deps in graph.items()}
  for module in edges:
    assert module not in _reachable(edges, module), f"{module} imports itself through {sorted(edges[module])}"


@pytest.mark.parametrize("module", ["vaebm_jax.sampling", "vaebm_jax.workdir", "vaebm_jax.models.nvae",
                                    "vaebm_jax.models.interface", "vaebm_jax.metrics.likelihood"])
def test_library_layers_import_no_training_code(module):
  reached = _reachable(_graph(), module)
  for training in ("vaebm_jax.train_vae", "vaebm_jax.train_ebm", "vaebm_jax.loop", "vaebm_jax.data"):
    assert training not in reached, f"{module} reaches {training}"


def test_both_stage_loops_share_the_loop_module():
  graph = _graph()
  assert "vaebm_jax.loop" in graph["vaebm_jax.train_vae"] and "vaebm_jax.loop" in graph["vaebm_jax.train_ebm"]
  for stage in ("train_vae", "train_ebm"):
    source = open(os.path.join(PACKAGE, f"{stage}.py")).read()
    assert "loop.run(" in source and "loop.start(" in source and "loop.keep_if_finite(" in source
