"""The packages' lazy exports are visible to type checkers: each ``__init__``'s ``if TYPE_CHECKING:``
imports name exactly the names its ``__getattr__`` serves, from the same modules."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _type_checking_imports(path: Path) -> dict[str, str]:
    """name -> module of the imports under ``if TYPE_CHECKING:``."""
    out: dict[str, str] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.module
                for alias in imp.names:
                    out[alias.asname or alias.name] = imp.module
    return out


@pytest.mark.parametrize("package, prefix", [("guardrails", ""), ("guardrails.defenses", "guardrails.defenses."),
                                             ("steering", "steering.")])
def test_type_checking_imports_match_lazy_exports(package, prefix):
    mod = importlib.import_module(package)
    seen = _type_checking_imports(Path(mod.__file__))
    assert seen == {name: prefix + module for name, module in mod._EXPORTS.items()}


@pytest.mark.parametrize("package", ["guardrails", "steering", "prompts"])
def test_packages_are_marked_typed(package):
    assert (ROOT / package / "py.typed").is_file()
