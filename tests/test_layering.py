"""The package's import structure, read from the source (nothing is imported): imports point one way
(train -> models, data, optim, nn; models -> nn), no module of lowrank_jax is in an import circle,
and none hides an import of the package inside a function (how the last circle was hidden)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lowrank_jax"
# What each subpackage may import of the project (besides itself).
ALLOWED = {"optim": set(), "nn": set(), "data": set(), "models": {"nn"}, "train": {"models", "data", "optim", "nn"}}


def _modules() -> dict[str, Path]:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


MODULES = _modules()


def _imported(module: str, node: ast.AST) -> list[str]:
  """The project modules an import statement loads (a name imported from a package counts as its
  submodule when it is one)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name in MODULES]
  if not isinstance(node, ast.ImportFrom):
    return []
  base = node.module or ""
  if node.level:
    parts = module.split(".")
    package = parts if MODULES[module].name == "__init__.py" else parts[:-1]
    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
  return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
          if base in MODULES or f"{base}.{a.name}" in MODULES]


def _edges() -> dict[str, set[str]]:
  edges = {}
  for module, path in MODULES.items():
    tree = ast.parse(path.read_text())
    edges[module] = {m for node in ast.walk(tree) for m in _imported(module, node) if m != module}
  return edges


def test_subpackages_import_one_way():
  wrong = [f"{m} -> {d}" for m, deps in _edges().items() for d in deps
           if m.count(".") >= 1 and d.count(".") >= 1 and d.split(".")[1] != m.split(".")[1]
           and d.split(".")[1] not in ALLOWED.get(m.split(".")[1], set())]
  assert not wrong, wrong


def test_no_import_circle():
  edges, index, low, stack, on_stack, circles = _edges(), {}, {}, [], set(), []

  def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        circles.append(sorted(component))

  for v in edges:
    if v not in index:
      visit(v)
  assert not circles, circles


def test_no_project_import_inside_a_function():
  hidden = []
  for module, path in MODULES.items():
    for fn in ast.walk(ast.parse(path.read_text())):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        hidden += [f"{module}:{node.lineno}" for node in ast.walk(fn) if _imported(module, node)]
  assert not hidden, hidden
