"""The shape the code keeps: files sized for one concern, functions that fit a screen, one
mechanism per job, and no machine's name in the code."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "reslab"


def sources(folder: Path = SRC) -> list[Path]:
    return sorted(folder.rglob("*.py"))


@pytest.mark.parametrize(("path", "most"), [("engine/train.py", 450), ("cli/detect.py", 400)])
def test_files_stay_under_their_size(path, most):
    lines = len((SRC / path).read_text().splitlines())
    assert lines < most, f"{path} has {lines} lines"


def long_functions(text: str, most: int) -> list[str]:
    return [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > most
    ]


def test_no_function_in_src_is_over_80_lines():
    found = {p.name: long_functions(p.read_text(), 80) for p in sources()}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_length_check_finds_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(81))
    assert long_functions(f"def f():\n{body}\n", 80) == ["f (82 lines)"]


def test_src_passes_the_complexity_limit():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "C901", "--no-cache", "src"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout
    assert "max-complexity = 12" in (ROOT / "pyproject.toml").read_text()


def mentions(pattern: str, paths: list[Path]) -> list[str]:
    return [
        f"{p.relative_to(ROOT)}:{n}"
        for p in paths
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(pattern, line)
    ]


def test_no_machine_is_named_in_the_code():
    assert mentions(r"EPYC|Xeon|H200", sources()) == []


def test_benchmarks_never_import_the_cli():
    assert mentions(r"^\s*(from|import) reslab\.cli", sources(ROOT / "benchmarks")) == []


def test_one_place_builds_an_average_and_none_a_scheduler_of_its_own():
    code = sources() + sources(ROOT / "benchmarks")

    def files(pattern):
        return {where.split(":")[0] for where in mentions(pattern, code)}

    assert files(r"AveragedModel\(") == {"src/reslab/engine/ema.py"}
    assert files(r"lr_scheduler\.|def lr_factor|def paper_lr|def warmup_cosine") == {
        "src/reslab/engine/schedules.py"
    }
