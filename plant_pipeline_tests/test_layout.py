"""The package's shape, read from the source with ast: the core never imports Dagster, nothing imports
Dagster's internals, no module imports another's private names, and the Dagster layer reads no environment
variable at import."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "plant_pipeline" / "ml"
DAGSTER_LAYER = [REPO / "plant_pipeline" / "defs", REPO / "plant_pipeline" / "definitions.py"]
# Where the layer rules apply: the package and the benchmarks that call it.
CHECKED = [REPO / "plant_pipeline", REPO / "bench"]
# The separate, dependency-free Pipes package: the training child process may report through it.
ALLOWED_IN_CORE = {"dagster_pipes"}


def _modules(*roots: Path) -> list[Path]:
    return sorted(path for root in roots for path in ([root] if root.is_file() else root.rglob("*.py")))


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every import in the file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            found.append((node.lineno, module, [alias.name for alias in node.names]))
    return found


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{line}"


def dagster_imports_in_core() -> list[str]:
    offenders = []
    for path in _modules(CORE):
        for line, module, _ in _imports(path):
            top = module.split(".")[0]
            if (top == "dagster" or top.startswith("dagster_")) and top not in ALLOWED_IN_CORE:
                offenders.append(f"{_where(path, line)} imports {module}")
    return offenders


def dagster_internal_imports() -> list[str]:
    offenders = []
    for path in _modules(*CHECKED, REPO / "plant_pipeline_tests"):  # the tests use the public API too
        for line, module, names in _imports(path):
            if module == "dagster._core" or module.startswith("dagster._core."):
                offenders.append(f"{_where(path, line)} imports {module}")
            elif module == "dagster" and "_core" in names:
                offenders.append(f"{_where(path, line)} imports dagster._core")
    return offenders


class _ImportTimeEnvironment(ast.NodeVisitor):
    """Collects os.environ / os.getenv uses that run on import: not in function bodies, but in decorators and
    default values, which run when the ``def`` does."""

    def __init__(self):
        self.lines: list[int] = []

    def visit_FunctionDef(self, node):
        for part in [*node.decorator_list, *node.args.defaults, *node.args.kw_defaults]:
            if part is not None:
                self.visit(part)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node):
        for part in node.args.defaults:
            self.visit(part)

    def visit_Attribute(self, node):
        if isinstance(node.value, ast.Name) and node.value.id == "os" and node.attr in ("environ", "getenv"):
            self.lines.append(node.lineno)
        self.generic_visit(node)


def environment_read_at_import(paths: list[Path]) -> list[str]:
    offenders = []
    for path in _modules(*paths):
        visitor = _ImportTimeEnvironment()
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        offenders += [f"{_where(path, line)} reads the environment at import" for line in visitor.lines]
    return offenders


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_name_imports() -> list[str]:
    offenders = []
    for path in _modules(*CHECKED):
        for line, module, names in _imports(path):
            private = [name for name in names if _private(name)]
            if private:
                offenders.append(f"{_where(path, line)} imports {', '.join(private)} from {module}")
    return offenders


def test_the_rules_see_what_they_look_for(tmp_path):
    env = tmp_path / "env.py"
    env.write_text("import os\nA = os.environ.get('A')\ndef f(b=os.getenv('B')):\n    return os.environ['C']\n"
                   "class K:\n    d = os.environ.get('D')\n")
    assert environment_read_at_import([env]) == [f"{_where(env, n)} reads the environment at import" for n in (2, 3, 6)]

    sample = tmp_path / "sample.py"
    sample.write_text("import dagster\nfrom dagster._core.errors import X\nfrom a.b import _hidden, shown, __all__\n"
                      "def f():\n    from dagster_pipes import open_dagster_pipes\n")
    assert [module for _, module, _ in _imports(sample)] == ["dagster", "dagster._core.errors", "a.b",
                                                             "dagster_pipes"]
    assert [name for name in ["_hidden", "shown", "__all__"] if _private(name)] == ["_hidden"]


def test_the_core_never_imports_dagster():
    assert _modules(CORE), f"no modules under {CORE}"
    assert dagster_imports_in_core() == []


def test_nothing_imports_dagster_internals():
    assert dagster_internal_imports() == []


def test_the_dagster_layer_reads_the_environment_when_it_loads_not_at_import():
    # Import-time values go stale (tests, `dg`, the webserver import once); @definitions functions run at load.
    assert environment_read_at_import(DAGSTER_LAYER) == []


def test_no_module_imports_another_modules_private_names():
    assert private_name_imports() == []
