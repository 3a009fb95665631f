"""The documentation: a strict site build, a short README, a generated results page, and local
links that resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "benchmarks" / "report.py"
README_MAX_LINES = 300

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def local_links(path: Path) -> list[str]:
    """Link targets in a Markdown file that point at files, outside code."""
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text()))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor on the same page
        targets.append(target.split("#", 1)[0])
    return targets


def broken_links(path: Path) -> list[str]:
    return [t for t in local_links(path) if not (path.parent / t).exists()]


def test_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "results" / "index.html").exists()
    # the result files the pages link to are served beside them
    assert list((tmp_path / "site" / "benchmarks" / "results").glob("*.json"))


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_results_page_is_generated():
    result = subprocess.run(
        [sys.executable, str(REPORT), "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_report_check_fails_on_a_stale_page(tmp_path):
    stale = tmp_path / "results.md"
    stale.write_text("# Results\n\nTyped by hand.\n")
    result = subprocess.run(
        [sys.executable, str(REPORT), "--check", "--out", str(stale)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_local_links_resolve(page):
    assert broken_links(page) == []


def test_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# there\n")
    page.write_text(
        "[ok](there.md#a) [web](https://example.org) [anchor](#b) `[code](nowhere.md)`\n"
        "```\n[fenced](nowhere.md)\n```\n"
        "[broken](missing.md) ![image](missing.png)\n"
    )
    assert broken_links(page) == ["missing.md", "missing.png"]


RELIABILITY = ROOT / "docs" / "reliability.md"
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
# every test in these files is a hostile case and has its row in the reliability page
HOSTILE_FILES = ("tests/test_bad_input.py", "tests/engine/test_run_folder.py")


def hostile_rows(text: str) -> list[tuple[str, str]]:
    section = text.split("## Hostile cases", 1)[1].split("\n## ", 1)[0]
    return TEST_REF.findall(section)


def missing_tests(rows: list[tuple[str, str]]) -> list[str]:
    return [
        f"{path}::{name}"
        for path, name in rows
        if not (ROOT / path).is_file() or f"def {name}(" not in (ROOT / path).read_text()
    ]


def test_reliability_table_names_tests_that_exist_and_covers_the_hostile_files():
    rows = hostile_rows(RELIABILITY.read_text())
    assert len(rows) >= 30 and not missing_tests(rows)
    named = {name for _, name in rows}
    for path in HOSTILE_FILES:
        tests = re.findall(r"^def (test_\w+)\(", (ROOT / path).read_text(), re.M)
        assert tests and not set(tests) - named, f"{path}: {set(tests) - named} have no row"


def test_reliability_check_finds_a_renamed_test():
    rows = hostile_rows(RELIABILITY.read_text())
    assert missing_tests([(rows[0][0], rows[0][1] + "_renamed")]) == [
        f"{rows[0][0]}::{rows[0][1]}_renamed"
    ]
