"""The package's shape: no import cycle, serving free of training code, one CLI pattern.

- An AST scan of every module (imports at any depth, including those inside functions)
  finds no cycle between the package's modules.
- Importing the serving side (`predict`, `predictor`, `inference`, `model_loader`,
  `exporter`, `export`) loads no training module.
- Every command-line tool answers `--help` with exit status 0, refuses stray arguments,
  and reports a misspelt config field in one line with exit status 2, creating nothing.
"""

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "prosona_jax")
TOOLS = ("main", "grid", "predict", "export", "convert", "score", "inspect_data", "serve")
TRAINING = ("prosona_jax.trainer", "prosona_jax.run", "prosona_jax.ablation",
            "prosona_jax.evaluate", "prosona_jax.methods", "prosona_jax.grid",
            "prosona_jax.main", "prosona_jax.optimizers", "prosona_jax.losses")
SERVING = ("prosona_jax.predict", "prosona_jax.predictor", "prosona_jax.inference",
           "prosona_jax.model_loader", "prosona_jax.exporter", "prosona_jax.export",
           "prosona_jax.image_io", "prosona_jax.tiling", "prosona_jax.serve",
           "prosona_jax.webapp")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, modules: set[str]) -> set[str]:
  """The package modules `path` imports, anywhere in the file."""
  tree = ast.parse(open(path).read(), path)
  out = set()
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    for name in names:
      # `import a.b.c` also imports a and a.b (their __init__ runs).
      parts = name.split(".")
      for i in range(1, len(parts) + 1):
        if ".".join(parts[:i]) in modules:
          out.add(".".join(parts[:i]))
  return out


def import_graph() -> dict[str, set[str]]:
  files = [os.path.join(d, f) for d, _, fs in os.walk(PACKAGE) for f in fs if f.endswith(".py")]
  modules = {_module_name(f) for f in files}
  return {_module_name(f): _imports(f, modules) - {_module_name(f)} for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycle():
  graph = import_graph()
  assert len(graph) > 40 and "prosona_jax.run" in graph["prosona_jax.main"]
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_serving_code_imports_no_training_module():
  graph = import_graph()
  reach, todo = set(), list(SERVING)
  while todo:
    m = todo.pop()
    if m not in reach:
      reach.add(m)
      todo.extend(graph.get(m, ()))
  leaked = sorted(m for m in reach if m.startswith(TRAINING))
  assert not leaked, f"serving modules reach training modules: {leaked}"
  # And at run time: importing predict loads none of them.
  code = ("import sys, prosona_jax.predict, prosona_jax.predictor, prosona_jax.exporter; "
          "print('\\n'.join(sorted(sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                       text=True, check=True, env=dict(os.environ, PYTHONPATH=REPO)).stdout
  loaded = [m for m in out.split() if m.startswith(TRAINING)]
  assert not loaded, loaded


def _tool(tool: str, *args: str, cwd=REPO):
  return subprocess.run([sys.executable, "-m", f"prosona_jax.{tool}", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))


@pytest.mark.parametrize("tool", TOOLS)
def test_help_exits_zero_and_stray_arguments_are_refused(tool):
  proc = _tool(tool, "--help")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--" in proc.stdout
  stray = ("a", "b") if tool == "inspect_data" else ("stray",)
  proc = _tool(tool, *stray)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert "unexpected arguments" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("tool", ["main", "grid"])
def test_misspelt_config_field_is_one_line_and_creates_nothing(tool, tmp_path):
  workdir = tmp_path / "never"
  proc = _tool(tool, "--config=configs/demo.py", "--config.stage1.lrr=1",
               f"--workdir={workdir}")
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) <= 5, proc.stderr
  assert "lrr" in proc.stderr and "'lr'" in proc.stderr and "Traceback" not in proc.stderr
  assert not workdir.exists()


@pytest.mark.parametrize("args,expected", [
    (("--config=configs/nope.py",), "no such config file"),
    (("--config=configs/demo.py:fol=1",), "unknown argument 'fol'"),
    (("--config.stage1.checkpoint=x",), "renamed: use --config.stage2.init_from"),
    (("--config.stage1.lr=abc",), "--config.stage1.lr"),
    (("--config.data.format=npz", "--config.data.path=/no/such/file.npz"), "file.npz"),
    (("--config.stages=stage3",), "config.stages"),
])
def test_user_mistakes_end_in_one_line_with_status_2(args, expected, tmp_path):
  proc = _tool("main", *args, f"--workdir={tmp_path / 'w'}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if "error:" in l]
  assert len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w" / "config.json").exists()


def test_missing_model_folder_is_a_user_error(tmp_path):
  proc = _tool("predict", f"--model={tmp_path / 'none'}", f"--input={tmp_path / 'x.npy'}",
               f"--out={tmp_path / 'out'}")
  assert proc.returncode == 2 and "no such model folder" in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr
