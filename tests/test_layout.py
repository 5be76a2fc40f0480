"""The layout: one file per stage, no stage importing another; common.py (the paper's shared
pieces) may import utils.py (their engineering), utils.py nothing of the project."""

from __future__ import annotations

import ast
import sys

import pytest
from conftest import ROOT

ALLOWED = {  # the project's modules and what each may import of the project
    "prep": {"utils", "demo"},  # demo.py is prep's synthesizer of the demo set
    "train_dino": {"utils"},
    "train_proj": {"common", "utils"},
    "evaluate": {"common", "utils", "demo"},  # demo.py owns the demo's vocabulary
    "analyze": {"common", "utils", "demo"},
    "common": {"utils"},
    "utils": set(),
    "demo": {"utils"},
}


def project_imports(name: str) -> set[str]:
    """The project modules that ROOT/{name}.py imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_imports_follow_the_layout(name):
    extra = project_imports(name) - ALLOWED[name]
    assert not extra, f"{name}.py imports {sorted(extra)}: no stage imports another stage"


def test_the_checker_sees_imports(tmp_path, monkeypatch):
    # a planted stage that imports another, the way a regression would
    (tmp_path / "train_dino.py").write_text("import os\nfrom train_proj import main\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert project_imports("train_dino") == {"train_proj"}
