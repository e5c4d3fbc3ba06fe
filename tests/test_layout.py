"""The tree keeps its plan: no import circles, the QA suites stay out of the wheel, the light
parts stay light, and the architecture's module map names every module. (The layer contracts
themselves are import-linter's, in ``make lint``.)"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import grimp
import pytest

from tests.helpers import REPO_ROOT, build_wheel


def cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """One circle through each module that lies on any (imports inside functions count)."""
    found: list[list[str]] = []
    done: set[str] = set()
    for start in sorted(modules):
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            module, path = stack.pop()
            for nxt in sorted(graph.find_modules_directly_imported_by(module) & modules):
                if nxt == start and start not in done:
                    found.append(path)
                    done.update(path)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return found


def test_no_module_imports_itself_in_a_circle() -> None:
    graph = grimp.build_graph("streamproc", "qa")
    modules = {m for m in graph.modules if m.startswith(("streamproc.", "qa."))}
    packages = {m.rpartition(".")[0] for m in modules}
    # A package's __init__ re-exporting its submodules is not a circle of concepts.
    assert cycles(graph, modules - packages) == []


def test_the_wheel_holds_the_package_and_no_qa_suite(tmp_path: Path) -> None:
    names = zipfile.ZipFile(build_wheel(tmp_path)).namelist()
    assert not [n for n in names if re.search(r"(^qa/|^tests/|^bench/|harness|chaos|matrix)", n)]
    for wanted in ("testing/data/kafka/kafka.sh", "testing/data/kafka/pom.xml", "py.typed",
                   "summarize/data/sample_feed.jsonl", "inference/worker.py",
                   "kafka/processor.py"):
        assert f"streamproc/{wanted}" in names


def test_the_engine_and_the_qa_suites_import_without_torch() -> None:
    probe = ("import sys, streamproc, streamproc.testing.breakable, qa.chaos, qa.matrix; "
             "print(sorted({'torch', 'transformers', 'ctranslate2'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_architecture_map_names_every_module() -> None:
    text = (REPO_ROOT / "docs" / "architecture.md").read_text()
    tree = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "streamproc").rglob("*.py")
                  if p.name != "__init__.py")
    missing = [path for path in tree if f"`{path.removeprefix('streamproc/')}`" not in text]
    assert missing == []


def test_the_version_is_the_distributions_and_the_cli_prints_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    import streamproc
    from streamproc.cli import main

    assert streamproc.__version__ == version("streamproc")
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"streamproc {streamproc.__version__}"
