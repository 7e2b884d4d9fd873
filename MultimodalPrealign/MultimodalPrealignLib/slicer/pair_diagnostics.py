"""The pair diagnostics the panel shows as soon as both volumes are selected.

The full diagnostics are ``diagnose.diagnose_pair`` with the headers trusted (no pre-alignment; about a second);
when the voxels cannot be diagnosed (e.g. a volume without image data yet), header-only lines from the volume
nodes (sizes, spacings, extents, overlap of the boxes as stored) stand in.
"""

from __future__ import annotations

import logging

import numpy as np

from . import mrml_bridge


def _ras_bounds(volume_node) -> tuple[np.ndarray, np.ndarray]:
    bounds = [0.0] * 6
    volume_node.GetRASBounds(bounds)
    return np.array(bounds[0::2], dtype=float), np.array(bounds[1::2], dtype=float)


def pair_header_summary(fixed_node, moving_node) -> dict:
    """Header-only facts about a pair (no voxel copy): sizes, spacings, extents, overlap of the boxes as stored.

    ``header_overlap_fraction``: share of the smaller volume's box (RAS, axis aligned) inside the other
    one's box when both headers are trusted; 0 means the headers share no frame or the scans do not overlap.
    """
    summary: dict = {}
    boxes = {}
    for key, node in (("fixed", fixed_node), ("moving", moving_node)):
        image_data = node.GetImageData()
        dims = list(image_data.GetDimensions()) if image_data is not None else [0, 0, 0]
        lower, upper = _ras_bounds(node)
        boxes[key] = (lower, upper)
        summary[key] = {"name": node.GetName(), "size": dims,
                        "spacing_mm": [round(float(s), 4) for s in node.GetSpacing()],
                        "extent_mm": [round(float(v), 1) for v in (upper - lower)]}
    lower = np.maximum(boxes["fixed"][0], boxes["moving"][0])
    upper = np.minimum(boxes["fixed"][1], boxes["moving"][1])
    overlap = float(np.prod(np.maximum(upper - lower, 0.0)))
    volumes = [float(np.prod(np.maximum(b[1] - b[0], 0.0))) for b in boxes.values()]
    smaller = max(min(volumes), 1e-9)
    fixed_spacing = np.asarray(fixed_node.GetSpacing(), dtype=float)
    moving_spacing = np.asarray(moving_node.GetSpacing(), dtype=float)
    summary["header_overlap_fraction"] = round(min(1.0, overlap / smaller), 4)
    summary["voxel_volume_ratio_moving_over_fixed"] = round(float(np.prod(moving_spacing) / np.prod(fixed_spacing)), 3)
    summary["extent_ratio_moving_over_fixed"] = [round(float(m / max(f, 1e-9)), 3) for m, f in
                                                 zip(summary["moving"]["extent_mm"], summary["fixed"]["extent_mm"])]
    return summary


def diagnostics_lines(summary: dict) -> list:
    """Panel lines for :func:`pair_header_summary` (shown as soon as both volumes are selected)."""
    lines = []
    for key in ("fixed", "moving"):
        v = summary[key]
        lines.append(f"{key.capitalize()} '{v['name']}': {' x '.join(map(str, v['size']))} voxels, spacing "
                     f"{' x '.join(f'{x:g}' for x in v['spacing_mm'])} mm, extent "
                     f"{' x '.join(f'{x:g}' for x in v['extent_mm'])} mm")
    lines.append(f"Voxel volume ratio (moving/fixed): {summary['voxel_volume_ratio_moving_over_fixed']:g}; "
                 f"extent ratio per axis: {', '.join(f'{x:g}' for x in summary['extent_ratio_moving_over_fixed'])}")
    overlap = summary["header_overlap_fraction"]
    if overlap == 0:
        lines.append("The headers place the volumes apart (no shared frame): keep pre-alignment 'auto' or 'search'.")
    else:
        lines.append(f"Header overlap: {overlap * 100:.0f}% of the smaller volume's box.")
    return lines


def diagnostics_key(fixed_node, moving_node) -> tuple:
    """Identifies a pair and the state of its voxels, so the diagnostics are not recomputed needlessly."""
    def state(node):
        image = node.GetImageData()
        return node.GetID(), image.GetMTime() if image is not None else 0, str(node.GetSpacing())

    return state(fixed_node), state(moving_node)


def pair_diagnostics(fixed_node, moving_node) -> dict:
    """``diagnose.diagnose_pair`` of two volume nodes with the headers trusted (no pre-alignment): ~1 s."""
    from .. import diagnose

    fixed = mrml_bridge.volume_node_to_sitk(fixed_node, "fixed volume")
    moving = mrml_bridge.volume_node_to_sitk(moving_node, "moving volume")
    return diagnose.diagnose_pair(fixed, moving, None, "header")


def diagnostics_text(fixed_node, moving_node, diagnose_nodes=None) -> str:
    """The pair's diagnostics (``diagnose.format_diagnostics``, headers trusted) shown when both are selected.

    ``diagnose_nodes(fixed_node, moving_node)`` computes them (default :func:`pair_diagnostics`). Falls back to
    header-only lines when the voxels cannot be diagnosed (e.g. a volume without image data).
    """
    try:
        from .. import diagnose  # inside: a failing import also falls back to the header lines

        return diagnose.format_diagnostics((diagnose_nodes or pair_diagnostics)(fixed_node, moving_node))
    except Exception as err:
        logging.info("MultimodalPrealign: full pair diagnostics unavailable: %s", err)
        lines = [f"Full diagnostics unavailable: {err}"]
    try:
        lines += diagnostics_lines(pair_header_summary(fixed_node, moving_node))
    except Exception as err:  # a volume without image data yet
        lines.append(f"Header summary unavailable: {err}")
    return "\n".join(lines)


class DiagnosticsDisplay:
    """The panel's pair-diagnostics text: computed once per pair as soon as both volumes are selected (about a
    second), replaced by a run's own diagnostics (which also know the overlap after pre-alignment).

    ``text_edit``: the panel's ``diagnosticsTextEdit`` (a QPlainTextEdit).
    """

    def __init__(self):
        self.key = None  # diagnostics_key of the pair shown
        self.text = ""

    def forget(self) -> None:
        """Compute again for the next pair shown, even the same one (e.g. the scene was closed)."""
        self.key = None

    def update(self, text_edit, fixed_node, moving_node, ready: bool, diagnose_nodes=None) -> None:
        """Show the diagnostics of the selected pair (``ready``: two different volumes), computed when it changed.

        ``diagnose_nodes``: as in :func:`diagnostics_text`.
        """
        import slicer

        if not ready:
            self.key = None
            text_edit.setPlainText("Select two different volumes to see the pair's diagnostics.")
            return
        key = diagnostics_key(fixed_node, moving_node)
        if key != self.key:
            self.key = key
            text_edit.setPlainText("Diagnosing the pair...")
            slicer.app.processEvents()
            with slicer.util.WaitCursor():
                self.text = diagnostics_text(fixed_node, moving_node, diagnose_nodes)
        if text_edit.toPlainText() != self.text:
            text_edit.setPlainText(self.text)

    def show_run(self, text_edit, diagnostics: dict) -> None:
        """Show a run's own diagnostics (``report["diagnostics"]``)."""
        from .. import diagnose

        self.text = diagnose.format_diagnostics(diagnostics)
        text_edit.setPlainText(self.text)
