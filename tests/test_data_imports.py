"""edgevl_jax/data imports: no cycle, none hidden inside a function."""
import ast
import pathlib

import edgevl_jax

ROOT = pathlib.Path(edgevl_jax.__file__).parent
DATA = ROOT / "data"


def _module(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """edgevl_jax.data modules `path` imports, at any depth of its code."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      # `from pkg import mod` imports pkg.mod when it is a module.
      names = [f"{node.module}.{a.name}" for a in node.names]
      names = [n if n in modules else node.module for n in names]
    else:
      continue
    out |= {n for n in names if n in modules}
  return out


def _graph() -> dict[str, set[str]]:
  files = {_module(p): p for p in DATA.rglob("*.py")}
  return {m: _imports(p, set(files)) - {m} for m, p in files.items()}


def test_data_package_has_no_import_cycle():
  graph = _graph()
  assert "edgevl_jax.data.sources" in graph  # the walk found the package
  done, stack = set(), []

  def visit(m):
    if m in stack:
      cycle = stack[stack.index(m):] + [m]
      raise AssertionError("import cycle: " + " -> ".join(cycle))
    if m in done:
      return
    stack.append(m)
    for n in sorted(graph[m]):
      visit(n)
    stack.pop()
    done.add(m)

  for m in sorted(graph):
    visit(m)
  # The builders never reach the name -> loader table.
  for m, deps in graph.items():
    if m.endswith("_dataset_builder") or m.endswith(".local_rgbd"):
      assert "edgevl_jax.data.sources" not in deps, m


def test_data_imports_nothing_from_training_or_in_functions():
  # A lazy import of an optional heavy dependency would be fine; a lazy
  # import of the project's own code only hides a cycle.
  for path in DATA.rglob("*.py"):
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
      if not isinstance(node, (ast.Import, ast.ImportFrom)):
        continue
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""])
      if not any(n.startswith("edgevl_jax") for n in names):
        continue
      assert id(node) in top, f"{path}:{node.lineno} imports in a function"
      assert not any(n.startswith(("edgevl_jax.train", "edgevl_jax.run",
                                   "edgevl_jax.jobs", "edgevl_jax.eval"))
                     for n in names), f"{path}:{node.lineno}"


def _writes_outside_atomic_path(tree: ast.AST) -> list[int]:
  """Lines that write a file other than through utils.io."""
  inside = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.With) and any(
        isinstance(i.context_expr, ast.Call)
        and getattr(i.context_expr.func, "attr", "") == "atomic_path"
        for i in node.items):
      inside |= {id(n) for n in ast.walk(node)}
  bad = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call):
      continue
    name = getattr(node.func, "attr", getattr(node.func, "id", ""))
    mode = [a.value for a in node.args[1:2] + [k.value for k in node.keywords
                                               if k.arg == "mode"]
            if isinstance(a, ast.Constant)]
    owner = getattr(getattr(node.func, "value", None), "id", "")
    writes = ((name in ("replace", "rename") and owner in ("os", "shutil"))
              or name in ("dump", "save", "savez", "savez_compressed",
                          "write_text", "write_bytes")
              or (name == "open" and any(set(str(m)) & set("wax+")
                                         for m in mode)))
    if writes and id(node) not in inside:
      bad.append(node.lineno)
  return bad


def test_data_writes_files_only_through_utils_io():
  for path in DATA.rglob("*.py"):
    bad = _writes_outside_atomic_path(ast.parse(path.read_text()))
    assert not bad, f"{path} writes outside utils.io at lines {bad}"
    assert "jsonio" not in path.read_text(), f"{path}: read JSON via utils.io"
