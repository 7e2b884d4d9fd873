"""Static checks of the core and benchmark sources for memory-safety traps that result tests cannot catch."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "MultimodalPrealign").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))


def views_of_temporaries(path: Path) -> list[str]:
    """``sitk.GetArrayViewFromImage(<call>)``: the view shares the buffer of an image nobody holds, which
    Python frees as soon as the call returns; reading the view then is a use-after-free (it segfaulted the
    pipeline's validity mask on 3 M-voxel working grids)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "GetArrayViewFromImage"
                and node.args and isinstance(node.args[0], ast.Call)):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_array_view_of_a_temporary_image():
    assert SOURCES, "no sources found"
    found = [hit for path in SOURCES for hit in views_of_temporaries(path)]
    assert found == [], "array views of temporary images (keep the image in a variable): " + ", ".join(found)
