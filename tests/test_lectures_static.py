"""Static checks of the stored lectures: no graded function's source is shown, no warnings are stored."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from alignlib.checks import GRADED_IMPLEMENTATIONS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
LECTURES = sorted((ROOT / "lectures").glob("*.ipynb"))
GRADED = sorted({name for names in GRADED_IMPLEMENTATIONS.values() for name in names})


def code_cells(path: Path):
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def output_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


@pytest.mark.parametrize("path", LECTURES, ids=[p.name for p in LECTURES])
def test_no_graded_function_source_in_a_lecture(path):
    for i, cell in enumerate(code_cells(path)):
        for name in GRADED:
            assert not re.search(rf"getsource\([\w.]*\b{name}\b", cell.source), f"cell {i} prints {name}'s source"
            assert f"def {name}(" not in output_text(cell), f"cell {i}'s output shows {name}'s source"


@pytest.mark.parametrize("path", LECTURES, ids=[p.name for p in LECTURES])
def test_no_warnings_in_stored_outputs(path):
    for i, cell in enumerate(code_cells(path)):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                assert "Warning" not in out.get("text", ""), f"cell {i} stored a warning: {out['text'][:200]}"
