"""The Python snippets in README.md and docs/ compile, and every ``pgtasks.<name>`` they use
exists. (The examples in examples/ run for real in tests/acceptance.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import pgtasks

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for i, match in enumerate(BLOCK.finditer(page.read_text(encoding="utf-8"))):
            found.append((f"{page.name}#{i + 1}", match[1]))
    return found


def test_there_are_snippets_to_check() -> None:
    assert len(snippets()) > 20


@pytest.mark.parametrize(("where", "code"), snippets(), ids=[w for w, _ in snippets()])
def test_snippet_compiles_and_names_real_api(where: str, code: str) -> None:
    tree = compile(code, where, "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    assert isinstance(tree, ast.Module)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "pgtasks"
        ):
            assert hasattr(pgtasks, node.attr), f"{where}: pgtasks.{node.attr} does not exist"
