"""The package layering and the one command line: what a newcomer relies on without reading code."""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lesionserve.cli import BENCHMARKS, COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL_ENTRY_FOLDERS = ("training", "export", "benchmarks")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_library_imports_nothing_from_the_top_level_entry_folders():
    offenders = {
        str(path.relative_to(ROOT)): sorted(n for n in _imports(path) if n.split(".")[0] in TOP_LEVEL_ENTRY_FOLDERS)
        for path in (ROOT / "lesionserve").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_synthetic_renderer_needs_no_training_code():
    assert not [n for n in _imports(ROOT / "lesionserve" / "synthetic.py") if "training" in n]


@pytest.mark.parametrize("path", sorted(p for d in TOP_LEVEL_ENTRY_FOLDERS for p in (ROOT / d).glob("*.py")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_top_level_modules_are_thin_entry_points_over_the_package(path):
    imports = _imports(path)
    assert len(imports) == 1 and next(iter(imports)).startswith("lesionserve."), imports
    assert len(path.read_text().splitlines()) <= 6


def test_distribution_installs_only_the_lesionserve_package():
    from setuptools import find_packages

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    top = {name.split(".")[0] for name in find_packages(str(ROOT), include=include)}
    assert top == {"lesionserve"}


def test_every_subcommand_prints_its_own_help(capsys):
    for name in [*COMMANDS, "serve", *(f"bench {b}" for b in BENCHMARKS[1:])]:
        with pytest.raises(SystemExit) as info:
            main([*name.split(), "--help"])
        assert info.value.code == 0, name
        assert f"usage: lesionserve {name}" in capsys.readouterr().out, name


def test_console_entry_point_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "lesionserve", "--help"], capture_output=True, text=True, check=True).stdout
    assert all(name in out for name in [*COMMANDS, "serve", "bench"])


def test_repository_check_passes_on_the_committed_folder(capsys):
    assert main(["repository", "--check"]) == 0
    assert "all equal to their declaration" in capsys.readouterr().out
