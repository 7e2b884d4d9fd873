"""docs/batch.md says what the code does: options, manifest columns, summary columns, the Python signature, the
examples (they compile and call what exists), the headless Slicer command line."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import re
from pathlib import Path

from MultimodalPrealignLib import batch, cli
from MultimodalPrealignLib.batch import manifest

REPO = Path(__file__).resolve().parents[1]
GUIDE = (REPO / "docs" / "batch.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    return GUIDE.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def batch_parser() -> argparse.ArgumentParser:
    sub = cli.build_parser()._subparsers._group_actions[0]
    return sub.choices["batch"]


def test_every_option_in_the_command_table_exists_and_every_batch_option_is_documented():
    parser = batch_parser()
    known = {option for action in parser._actions for option in action.option_strings}
    documented = set(re.findall(r"`(--[a-z-]+)", section("The command")))
    assert documented <= known
    own = {"--out", "--scheduler", "--workers", "--threads-per-worker", "--resume", "--retries", "--skip-bad-rows"}
    assert own <= documented and own <= known


def test_manifest_columns_and_summary_columns_are_the_code_s():
    table = section("The manifest").split("| any `register` option |", 1)[1].split("\n", 1)[0]
    assert set(re.findall(r"`(\w+)`", table)) == set(manifest.ROW_OPTIONS)
    for column in (*manifest.REQUIRED_COLUMNS, *manifest.PATH_COLUMNS):
        assert f"`{column}`" in section("The manifest")
    listed = section("What it writes").split("Summary columns:", 1)[1].split("\n\n", 1)[0]
    names = set(re.findall(r"`(\w+)`", listed))
    names |= {f"{stem}_{when}" for stem in ("mean_dice", "mean_tre_mm")
              for when in ("before", "after") if f"`{stem}_before/after`" in listed}
    assert set(batch.ROW_FIELDS) <= names


def test_python_examples_compile_and_call_batch_run_with_its_keywords():
    blocks = re.findall(r"```python\n(.*?)```", GUIDE, re.S)
    assert len(blocks) >= 2
    parameters = set(inspect.signature(batch.run).parameters)
    calls = 0
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "run" and \
                    getattr(node.func.value, "id", "") == "batch":
                assert {k.arg for k in node.keywords} <= parameters
                calls += 1
    assert calls >= 2


def test_documented_signature_is_the_real_one():
    text = " ".join(section("Python").split("`batch.run(", 1)[1].split(")` returns", 1)[0].split())
    documented = [part.strip() for part in text.split(",") if part.strip() and part.strip() != "*"]
    signature = inspect.signature(batch.run)
    real = [name if p.default is inspect.Parameter.empty else f"{name}={p.default!r}".replace("'", '"')
            for name, p in signature.parameters.items()]
    assert documented == real
    fields = section("Python").split("returns a `BatchResult` (", 1)[1].split(")", 1)[0]
    named = set(re.findall(r"`(\w+)`", fields))
    assert len(named) >= 6 and named <= set(batch.BatchResult.__dataclass_fields__)


def test_headless_slicer_command_parses():
    spec = importlib.util.spec_from_file_location("register_cohort", REPO / "docs" / "examples" / "register_cohort.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    command = re.search(r"```bash\nSlicer (.*?)```", section("Headless Slicer: `docs/examples/register_cohort.py`"),
                        re.S).group(1).replace("\\\n", " ")
    assert "--python-script docs/examples/register_cohort.py" in command
    args = script.parse_args(command.split("register_cohort.py", 1)[1].split("[", 1)[0].split())
    assert (args.manifest, args.out) == ("cohort.csv", "cohort_out")
    for option in re.findall(r"(--[a-z-]+)", command.split("register_cohort.py", 1)[1]):
        assert option.lstrip("-").replace("-", "_") in vars(args), option
