"""Import rules of edgevl_jax, checked on the source (nothing is imported).

Every `import` / `from ... import` statement of every module under
edgevl_jax/ counts, at module level or inside a function (an in-function
import still runs, and still closes a cycle). `from pkg import name` is an
edge to `pkg.name` when that is a module, else to `pkg`; relative imports
are resolved. Importing `a.b.c` also runs `a/__init__` and `a.b/__init__`;
those implicit parent-package edges are not counted (every package would
otherwise be in a cycle with its own modules). Dynamic imports
(importlib.import_module) are not counted.

The rules are data (FORBIDDEN, KNOWN_CYCLES) so they can be adjusted; a rule
about a package that does not exist yet passes vacuously.
"""
from __future__ import annotations

import ast
import os
from typing import Iterator

PACKAGE = "edgevl_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), PACKAGE)

_ABOVE_LIBRARIES = ("edgevl_jax.run", "edgevl_jax.jobs", "edgevl_jax.edgevl",
                    "edgevl_jax.datafree", "edgevl_jax.classification",
                    "edgevl_jax.presets", "edgevl_jax.main",
                    "edgevl_jax.train", "edgevl_jax.eval")
# (importer, forbidden targets, allowed exceptions, why); names are package
# prefixes: "a.b" covers a.b and every a.b.* module.
FORBIDDEN = [
    *((lib, _ABOVE_LIBRARIES, (), "libraries sit below the runner and the "
       "jobs") for lib in ("edgevl_jax.models", "edgevl_jax.data",
                           "edgevl_jax.losses", "edgevl_jax.quant",
                           "edgevl_jax.analysis", "edgevl_jax.utils")),
    ("edgevl_jax.run", ("edgevl_jax.jobs", "edgevl_jax.edgevl",
                        "edgevl_jax.datafree", "edgevl_jax.presets",
                        "edgevl_jax.classification", "edgevl_jax.export",
                        "edgevl_jax.data"), (),
     "the runner finds jobs through its registry and knows no job's pieces"),
    ("edgevl_jax.run", ("edgevl_jax.models",),
     ("edgevl_jax.models", "edgevl_jax.models.layers"),
     "the runner knows no model family (jobs pass models in)"),
    ("edgevl_jax.jobs", ("edgevl_jax.jobs",), (),
     "a job never imports another job; shared pieces live in a library"),
    *((lib, ("edgevl_jax.jobs", "edgevl_jax.presets", "edgevl_jax.main"), (),
       "libraries never import jobs or configs")
      for lib in ("edgevl_jax.edgevl", "edgevl_jax.datafree",
                  "edgevl_jax.classification", "edgevl_jax.export")),
    ("edgevl_jax.utils", ("edgevl_jax",), ("edgevl_jax.utils",),
     "utils is the bottom layer: stdlib and numpy only"),
]

# Import cycles that exist and are accepted for now, each as the set of
# modules of its strongly connected component. The test fails on any other
# cycle, and on an entry here that is no longer a cycle (remove it then).
KNOWN_CYCLES: list[set[str]] = []


def _modules() -> dict[str, str]:
  """Module name -> file, for every .py under edgevl_jax/."""
  out = {}
  for folder, _, files in os.walk(ROOT):
    for f in files:
      if not f.endswith(".py"):
        continue
      rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))
      parts = rel[:-len(".py")].split(os.sep)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = os.path.join(folder, f)
  return out


def _known(name: str, modules: dict[str, str]) -> str | None:
  """The longest prefix of `name` that is an edgevl_jax module."""
  parts = name.split(".")
  while parts:
    if ".".join(parts) in modules:
      return ".".join(parts)
    parts.pop()
  return None


def _imports(module: str, file: str, modules: dict[str, str]
             ) -> Iterator[tuple[str, int]]:
  """(imported edgevl_jax module, line) for every import in `file`."""
  with open(file, encoding="utf-8") as f:
    tree = ast.parse(f.read(), file)
  is_package = file.endswith("__init__.py")
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = module.split(".")
        anchor = anchor[:len(anchor) - node.level + is_package]
        base = ".".join(anchor + ([base] if base else []))
      names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules
               else base for alias in node.names]
    else:
      continue
    for name in names:
      target = _known(name, modules)
      if target and target != module:
        yield target, node.lineno


def _graph() -> dict[str, dict[str, int]]:
  """module -> {imported module: first line importing it}."""
  modules = _modules()
  graph = {}
  for module, file in modules.items():
    edges = {}
    for target, line in _imports(module, file, modules):
      edges.setdefault(target, line)
    graph[module] = edges
  return graph


def _matches(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + ".")


def _components(graph: dict[str, dict[str, int]]) -> list[set[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(component)

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def _cycle_path(graph: dict[str, dict[str, int]], component: set[str]) -> str:
  """One cycle through the component, 'a (line 3) -> b (line 9) -> a'."""
  start = min(component)
  paths = {start: [start]}
  queue = [start]
  while queue:
    v = queue.pop(0)
    for w in sorted(graph[v]):
      if w == start:
        hops = paths[v] + [start]
        return " -> ".join(f"{a} (line {graph[a][b]})"
                           for a, b in zip(hops, hops[1:])) + f" -> {start}"
      if w in component and w not in paths:
        paths[w] = paths[v] + [w]
        queue.append(w)
  raise AssertionError(f"no cycle through {sorted(component)}")


def test_no_import_cycles():
  graph = _graph()
  found = _components(graph)
  new = [c for c in found if c not in KNOWN_CYCLES]
  stale = [c for c in KNOWN_CYCLES if c not in found]
  assert not new, "import cycles (one path, the line of each import; all " \
      "modules of the cycle):\n" + "\n".join(
          f"{_cycle_path(graph, c)}\n  modules: {sorted(c)}" for c in new)
  assert not stale, (f"KNOWN_CYCLES entries that are no longer cycles; "
                     f"remove them: {[sorted(c) for c in stale]}")


def test_layers_import_only_downwards():
  graph = _graph()
  problems = []
  for importer, targets, allowed, why in FORBIDDEN:
    for module, edges in sorted(graph.items()):
      if not _matches(module, importer):
        continue
      for target, line in sorted(edges.items()):
        if (any(_matches(target, t) for t in targets)
            and target not in allowed):
          problems.append(f"{module} (line {line}) imports {target}: {why}")
  assert not problems, "\n".join(problems)


def test_the_checker_sees_in_function_and_relative_imports(tmp_path):
  """The parser itself: an in-function relative import is an edge."""
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("def f():\n  from . import b\n")
  (pkg / "b.py").write_text("from pkg.a import f\n")
  modules = {"pkg": str(pkg / "__init__.py"), "pkg.a": str(pkg / "a.py"),
             "pkg.b": str(pkg / "b.py")}
  graph = {m: dict(_imports(m, f, modules)) for m, f in modules.items()}
  assert graph == {"pkg": {}, "pkg.a": {"pkg.b": 2}, "pkg.b": {"pkg.a": 1}}
  assert _components(graph) == [{"pkg.a", "pkg.b"}]
  assert _cycle_path(graph, {"pkg.a", "pkg.b"}) == (
      "pkg.a (line 2) -> pkg.b (line 1) -> pkg.a")
