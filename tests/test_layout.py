"""The package's layout: no import circle among freetf's modules, and the rooms that must
not reach the sweep engine or Ray do not (docs/architecture.md)."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "freetf"


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the freetf modules it imports, at module level or inside a function.

    ``from freetf.a import b`` names the submodule ``freetf.a.b`` when there is one, else
    the package ``freetf.a`` (its ``__init__``)."""
    files = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = name.split(".")
                    anchor = anchor if is_package else anchor[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                           for alias in node.names]
            for target in targets:
                while target and target not in files:  # freetf.a.b.name -> freetf.a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a closed path, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    graph["c"] = set()
    assert find_cycle(graph) is None


def test_the_graph_reads_function_level_and_submodule_imports(tmp_path):
    pkg = tmp_path / "freetf"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "one.py").write_text("def f():\n    from freetf.sub import two\n")
    (pkg / "sub" / "two.py").write_text("from freetf.sub.one import f\nfrom . import three\n")
    (pkg / "sub" / "three.py").write_text("import freetf.sub\n")
    graph = import_graph(pkg)
    assert graph["freetf.sub.one"] == {"freetf.sub.two"}
    assert graph["freetf.sub.two"] == {"freetf.sub.one", "freetf.sub.three"}
    assert graph["freetf.sub.three"] == {"freetf.sub"}


def test_freetf_has_no_import_circle():
    assert find_cycle(import_graph()) is None


def _imported_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\n"
                          "print('\\n'.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


def test_tracking_and_results_import_neither_the_sweep_engine_nor_ray():
    modules = _imported_after("import freetf.tracking, freetf.results.report, "
                              "freetf.results.analysis, freetf.results.phase, "
                              "freetf.results.over_training")
    assert not {m for m in modules if m.startswith(("freetf.sweeps", "ray"))}


def test_parsing_a_sweep_spec_imports_no_ray():
    """``from freetf.sweeps import load_sweep, run_sweep`` too: run_sweep loads Ray when
    first used."""
    for code in ("from freetf.sweeps.spec import load_sweep\n"
                 "load_sweep('freetf/configs/search_kl.yaml')",
                 "from freetf.sweeps import load_sweep\nload_sweep('search_kl')"):
        modules = _imported_after(code)
        assert not {m for m in modules if m == "ray" or m.startswith("ray.")}
    public = _imported_after("from freetf.sweeps import load_sweep, run_sweep, SweepResult\n"
                             "import freetf.sweeps.sweep as driver\n"
                             "assert run_sweep is driver.run_sweep\n"
                             "assert SweepResult is driver.SweepResult")
    assert "ray" in public


def test_the_command_line_loads_no_ray_before_a_command_runs():
    """``freetf --help`` and every parser (the study commands' too) import neither Ray nor
    MLflow: freetf/commands import them inside ``run``."""
    modules = _imported_after("from freetf.cli import build_parser\nbuild_parser()")
    assert not {m for m in modules if m.split(".")[0] in ("ray", "mlflow", "pandas")}


@pytest.mark.parametrize("room, above", [
    ("freetf.tracking", ("freetf.sweeps", "freetf.results", "freetf.experiments",
                         "freetf.training")),
    ("freetf.results", ("freetf.sweeps", "freetf.experiments", "freetf.training")),
    ("freetf.model", ("freetf.training", "freetf.tracking", "freetf.sweeps", "freetf.data")),
    ("freetf.evaluation", ("freetf.training", "freetf.tracking", "freetf.sweeps")),
    ("freetf.data", ("freetf.training", "freetf.tracking", "freetf.sweeps", "freetf.model")),
    ("freetf.config", ("freetf.model", "freetf.data", "freetf.training", "freetf.tracking")),
])
def test_a_room_imports_nothing_above_it(room, above):
    """Not even inside a function (docs/architecture.md: what each package may import)."""
    graph = import_graph()
    reaching = {(module, target) for module, targets in graph.items()
                if module == room or module.startswith(f"{room}.")
                for target in targets if target.startswith(above)}
    assert not reaching


def _named_paths() -> dict[str, set[str]]:
    """Every dotted ``freetf.`` name in the docs, the README, docstrings and comments ->
    the files naming it."""
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "bench" / "README.md"]
    for folder in ("freetf", "tune", "tools", "bench"):
        files += (ROOT / folder).rglob("*.py")
    found: dict[str, set[str]] = {}
    for path in files:
        for name in re.findall(r"\bfreetf(?:\.[A-Za-z_]\w*)+", path.read_text()):
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_freetf_path_named_in_docs_and_docstrings_imports():
    from freetf.tracking import tags

    not_paths = {v for v in vars(tags).values() if isinstance(v, str)} | {"freetf.json"}
    stale = {name: sorted(where) for name, where in _named_paths().items()
             if not any(name == t or name.startswith(f"{t}.") for t in not_paths)
             # mutmut's mutant names: x_<function>, xǁ<class>ǁ<method>
             and not re.search(r"\.x(_|ǁ)", name)
             and not _resolves(name)}
    assert not stale


def test_a_stale_path_is_found(tmp_path):
    assert _resolves("freetf.results.report.collect_runs")
    assert not _resolves("freetf.report.collect_runs")
    assert not _resolves("freetf.results.report.no_such_name")
