"""Stage 3: pre-alignment, the initial fixed->moving transform (physical LPS mm).

The registry of methods (:data:`METHODS`), each ``(PrealignInputs) -> PrealignResult``:
``none``, ``header``, ``geometry``, ``moments`` (:mod:`.simple`: headers and image moments), ``search``
(:mod:`.search`: global search, no labels needed) and ``anatomy`` (:mod:`.anatomy`: matched structures of
both label maps). :mod:`.totalseg` runs TotalSegmentator to make those label maps.
"""

from __future__ import annotations

from typing import Callable

from ..errors import InputError
from . import anatomy, search
from .base import PrealignInputs, PrealignResult
from .simple import prealign_geometry, prealign_header, prealign_moments, prealign_none

#: Method name -> (function, needs label maps of both images). ``auto`` is resolved by :func:`choose_auto`.
METHODS: dict[str, tuple[Callable[[PrealignInputs], PrealignResult], bool]] = {
    "none": (prealign_none, False),
    "header": (prealign_header, False),
    "geometry": (prealign_geometry, False),
    "moments": (prealign_moments, False),
    "anatomy": (anatomy.prealign, True),
    "search": (search.prealign, False),
}

ALL_METHODS = ("auto", *METHODS)


def available_methods() -> list[str]:
    return list(METHODS)


def choose_auto(has_labels: bool) -> str:
    """``auto``: anatomy when both label maps are given, else the global search."""
    return "anatomy" if has_labels else "search"


def run_prealign(method: str, inputs: PrealignInputs) -> PrealignResult:
    """Run one method by name (``auto`` resolved here) and record which one ran."""
    has_labels = inputs.fixed_labels is not None and inputs.moving_labels is not None
    requested = method
    if method == "auto":
        method = choose_auto(has_labels)
    if method not in ALL_METHODS:
        raise InputError(f"Unknown pre-alignment method '{method}'", "use one of " + ", ".join(ALL_METHODS))
    function, needs_labels = METHODS[method]
    if needs_labels and not has_labels:
        raise InputError(f"Pre-alignment '{method}' needs label maps of both images",
                         "pass --fixed-labels and --moving-labels (e.g. TotalSegmentator output)")
    result = function(inputs)
    result.details.setdefault("requested", requested)
    return result


__all__ = ["ALL_METHODS", "METHODS", "PrealignInputs", "PrealignResult", "available_methods", "choose_auto",
           "run_prealign"]
