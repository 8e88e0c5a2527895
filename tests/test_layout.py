"""The house's rooms hold: the delivery engine (worker/engine) imports neither the operator's command
(worker/admin), the development tools (worker/devtools) nor the daemon's front door (worker/cli); those use
only what worker/engine/__init__.py exports; and the Worker's parts stay small. Read from the source
with ast, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import worker.engine
from tests.conftest import REPO

WORKER = REPO / "worker"


def _modules(room: str) -> list[Path]:
    return sorted((WORKER / room).rglob("*.py"))


def _imports(path: Path, top_level_only: bool = False) -> list[tuple[str, list[str], int]]:
    """(module, names taken from it, line) for every import statement of the file, at any depth unless
    `top_level_only`."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text())
    found = []
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def _within(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


@pytest.mark.parametrize("path", _modules("engine"), ids=lambda p: p.name)
def test_the_engine_imports_neither_admin_devtools_nor_cli(path):
    for module, names, line in _imports(path):
        targets = [module] + [f"{module}.{name}" for name in names]
        for target in targets:
            for room in ("worker.admin", "worker.devtools", "worker.cli"):
                assert not _within(target, room), f"{path.relative_to(REPO)}:{line} imports {target}"


@pytest.mark.parametrize("path", _modules("admin") + _modules("devtools"), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_admin_and_devtools_use_only_the_engines_public_pieces(path):
    public = set(worker.engine.__all__)
    for module, names, line in _imports(path):
        if not _within(module, "worker.engine"):
            continue
        where = f"{path.relative_to(REPO)}:{line}"
        assert module == "worker.engine", f"{where}: import from worker.engine, not its module {module}"
        assert all(not name.startswith("_") for name in names), f"{where}: a private name of the engine"
        assert set(names) <= public, f"{where}: {sorted(set(names) - public)} not exported by worker.engine"


def test_the_operators_command_loads_devtools_only_lazily():
    """Inside a function an import runs only when that command does (sink, demo, --embedded)."""
    for path in _modules("admin"):
        for module, names, line in _imports(path, top_level_only=True):
            targets = [module] + [f"{module}.{name}" for name in names]
            assert not any(_within(t, "worker.devtools") for t in targets), f"{path.relative_to(REPO)}:{line}"


def test_the_engines_exports_exist():
    for name in worker.engine.__all__:
        assert hasattr(worker.engine, name), name


WORKER_PARTS = ["loop.py", "claimer.py", "inflight.py", "settler.py", "lifecycle.py", "services.py", "health.py",
                "listener.py", "paths.py", "endpoint.py"]


@pytest.mark.parametrize("name", WORKER_PARTS)
def test_the_workers_parts_stay_small(name):
    """Worker is made of parts with one job each: none much over 120 lines, no function over 40."""
    path = WORKER / "engine" / name
    assert len(path.read_text().splitlines()) <= 150, f"{name}: split it by job rather than grow it"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno - node.lineno < 40, f"{name}:{node.lineno} {node.name} is over 40 lines"


def test_fp_outbox_loads_the_development_tools_only_for_their_commands():
    code = ("import sys; from worker.admin import main; main(['systemd-unit']); "
            "print(sorted(m for m in sys.modules if m.startswith('worker.devtools')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
