"""Data files shipped in ``resources/`` (presets, structure tables, thresholds): the one place that reads them."""

from __future__ import annotations

import json
from pathlib import Path

RESOURCES = Path(__file__).resolve().parent / "resources"


def load_resource_text(*parts: str) -> str:
    """Text of ``resources/<parts...>`` (UTF-8)."""
    return RESOURCES.joinpath(*parts).read_text(encoding="utf-8")


def load_resource_json(*parts: str):
    """Parsed JSON of ``resources/<parts...>`` (a fresh object on every call: callers may change it)."""
    return json.loads(load_resource_text(*parts))


def load_settings(*parts: str) -> dict:
    """A settings file of ``resources/`` (presets, rules) without its comment keys (names starting with '_')."""
    return {k: v for k, v in load_resource_json(*parts).items() if not k.startswith("_")}
