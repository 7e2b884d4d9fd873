"""Pair diagnostics: why registration may fail on these two images, and what to do about it.

``diagnose_pair`` measures both images (physical extent along the patient axes L, P, S; spacing;
orientation; DICOM patient position when known; intensity range and a modality guess; foreground
fraction), how much of each lies inside the other under the header alignment and under the best
available pre-alignment, and the moving/fixed ratios per axis. Rules (thresholds in
``resources/diagnostics_rules.json``, explained in docs/diagnostics.md) turn the numbers into plain
advice sentences and a verdict. Inputs that are valid but implausible (sizes that suggest metres, nonsense voxel
sizes, a patch, noise, a negative voxel size in a header, two images in different units) are named first
(:mod:`.io.plausibility`, the same findings the verdict's content check uses). Transforms map FIXED physical points
to MOVING physical points (LPS mm).

Two parts, so that a run can diagnose before it pre-aligns: :func:`diagnose_images` (headers and images
only) and :func:`finish_diagnosis` (the overlap under the pre-alignment, advice, verdict).
"""

from __future__ import annotations

import math
import time

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import image_space, resample, transforms
from .geometry.masks import foreground_mask
from .io import plausibility
from .io.image_io import header_notes
from .io.modality import MODALITY_KEYS, guess_modality, intensity_summary, metadata, rules

AXIS_NAMES = ("left-right", "anterior-posterior", "head-feet")
#: Metadata keys that carry DICOM information into an image (dicom_series sets them; GDCM sets the tags).
PATIENT_POSITION_KEYS = ("MultimodalPrealign.patient_position", "0018|5100")
VOLUME_KEY = "MultimodalPrealign.dicom_volume"
POSITION_NAMES = {"HF": "head-first", "FF": "feet-first"}
LIE_NAMES = {"S": "supine", "P": "prone", "DL": "decubitus left", "DR": "decubitus right"}


# ------------------------------------------------------------------------------------------ one image


def orientation_info(image: sitk.Image) -> dict:
    """Direction letters of the voxel axes i, j, k (LPS: L/R, P/A, S/I), the slice plane and obliqueness."""
    d = image_space.direction_matrix(image)
    letters, worst = "", 0.0
    for column in range(3):
        v = d[:, column]
        axis = int(np.argmax(np.abs(v)))
        letters += ("L", "P", "S")[axis] if v[axis] > 0 else ("R", "A", "I")[axis]
        worst = max(worst, math.degrees(math.acos(min(1.0, abs(float(v[axis]))))))
    k_axis = int(np.argmax(np.abs(d[:, 2])))
    plane = ("sagittal", "coronal", "axial")[k_axis]
    return {"axes_point_to": letters, "slice_plane": plane, "oblique_deg": round(worst, 2)}


def foreground_summary(work: sitk.Image) -> dict:
    """Share of the voxels in the foreground (body) mask and the mask's extent along L, P, S (mm)."""
    mask = foreground_mask(work, working_spacing_mm=None)
    array = sitk.GetArrayViewFromImage(mask)
    count = int(np.count_nonzero(array))
    out = {"fraction": round(count / float(array.size), 4),
           "volume_ml": round(count * image_space.voxel_volume_mm3(mask) / 1000, 1)}
    if count == 0:
        out["extent_mm_lps"] = [0.0, 0.0, 0.0]
        return out
    idx = np.argwhere(array > 0)[:, ::-1]  # (x, y, z)
    lo, hi = idx.min(0) - 0.5, idx.max(0) + 0.5
    corners = np.array([[lo[0] if a else hi[0], lo[1] if b else hi[1], lo[2] if c else hi[2]]
                        for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    a_matrix, origin = image_space.index_to_physical_matrix(mask)
    points = corners @ a_matrix.T + origin
    out["extent_mm_lps"] = [round(float(v), 2) for v in points.max(0) - points.min(0)]
    return out


def describe(image: sitk.Image, role: str, settings: dict, work: sitk.Image | None = None) -> dict:
    """Everything ``diagnose_pair`` reports about one image (JSON-ready)."""
    work = work if work is not None else resample.box_average_copy(image, settings["working_copy_spacing_mm"])
    intensity = intensity_summary(image, settings)
    dicom_modality = metadata(image, MODALITY_KEYS)
    out = {
        "role": role,
        "size": list(image.GetSize()),
        "spacing_mm": [round(v, 6) for v in image.GetSpacing()],
        "spacing_mm_lps": [round(float(v), 4) for v in image_space.spacing_along_patient_axes(image)],
        "voxel_volume_mm3": round(image_space.voxel_volume_mm3(image), 5),
        "extent_mm_lps": [round(float(v), 3) for v in image_space.extent_mm(image)],
        "bounding_box_lps": image_space.bounding_box(image).to_dict(),
        "center_mm_lps": [round(float(v), 3) for v in image_space.image_center(image)],
        "orientation": orientation_info(image),
        "patient_position": metadata(image, PATIENT_POSITION_KEYS),
        "dicom_volume": metadata(image, (VOLUME_KEY,)),
        "intensity": intensity,
        "modality": guess_modality(intensity, dicom_modality, settings),
        "foreground": foreground_summary(work),
        "structure": round(plausibility.structure_ratio(work), 3),
        "header_notes": header_notes(image),
    }
    return out


# ------------------------------------------------------------------------------------------ the pair


def per_axis_coverage(fixed: sitk.Image, moving: sitk.Image, fixed_to_moving: sitk.Transform) -> dict | None:
    """Per patient axis (in the fixed frame): share of each box's extent inside the other's box.

    The moving box is mapped into the fixed frame (inverse transform) and its axis-aligned bounding box
    is used, so the numbers are exact for header alignment of axis-aligned images and approximate
    under rotations. None when the transform has no inverse.
    """
    inverse = transforms.inverse_or_none(fixed_to_moving)
    if inverse is None:
        return None
    fixed_box = image_space.bounding_box(fixed)
    corners = transforms.transform_points(inverse, image_space.physical_corners(moving))
    moving_lower, moving_upper = corners.min(0), corners.max(0)
    inter = np.maximum(np.minimum(fixed_box.upper, moving_upper) - np.maximum(fixed_box.lower, moving_lower), 0)
    fixed_len = np.maximum(fixed_box.size, 1e-9)
    moving_len = np.maximum(moving_upper - moving_lower, 1e-9)
    return {"fixed_covered": [round(float(v), 4) for v in inter / fixed_len],
            "moving_covered": [round(float(v), 4) for v in inter / moving_len]}


def alignment_summary(fixed: sitk.Image, moving: sitk.Image, fixed_to_moving: sitk.Transform, method: str,
                      settings: dict) -> dict:
    """Overlap fractions, per-axis coverage and the centre distance under one fixed->moving transform."""
    overlap = image_space.overlap_fractions(fixed, moving, fixed_to_moving, int(settings["overlap_samples_per_axis"]))
    fixed_center_in_moving = transforms.transform_points(fixed_to_moving, image_space.image_center(fixed)[None, :])[0]
    out = {
        "method": method,
        "fixed_inside_moving": round(overlap["fixed"], 4),
        "moving_inside_fixed": round(overlap["moving"], 4),
        "per_axis": per_axis_coverage(fixed, moving, fixed_to_moving),
        "center_distance_mm": round(float(np.linalg.norm(fixed_center_in_moving
                                                         - image_space.image_center(moving))), 2),
    }
    if transforms.is_linear(fixed_to_moving):
        m = transforms.to_matrix(fixed_to_moving)
        points = image_space.grid_points(fixed, 6)
        out["rotation_deg"] = round(transforms.rotation_angle_deg(m), 2)
        out["mean_displacement_mm"] = round(float(np.mean(np.linalg.norm(
            transforms.transform_points(fixed_to_moving, points) - points, axis=1))), 2)
    return out


def suggested_working_spacing(fixed: sitk.Image, moving: sitk.Image, settings: dict) -> float:
    """About the cube root of the coarser image's voxel volume, rounded, within the rule's limits (mm)."""
    coarser = max(image_space.voxel_volume_mm3(fixed), image_space.voxel_volume_mm3(moving))
    step = float(settings["working_spacing_step_mm"])
    value = round(coarser ** (1.0 / 3.0) / step) * step
    return float(min(max(value, settings["working_spacing_min_mm"]), settings["working_spacing_max_mm"]))


def check_3d(fixed: sitk.Image, moving: sitk.Image) -> None:
    for name, image in (("fixed", fixed), ("moving", moving)):
        if image.GetDimension() != 3:
            raise InputError(f"The {name} image is {image.GetDimension()}D", "give 3D volumes")


def working_copies(fixed: sitk.Image, moving: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """The diagnostics' coarse copies (box averages at the rules' ``working_copy_spacing_mm``)."""
    spacing = rules()["working_copy_spacing_mm"]
    return resample.box_average_copy(fixed, spacing), resample.box_average_copy(moving, spacing)


def diagnose_images(fixed: sitk.Image, moving: sitk.Image,
                    work: tuple[sitk.Image, sitk.Image] | None = None) -> dict:
    """The part of the diagnostics that needs only the headers and the images (JSON-ready dict).

    ``work``: :func:`working_copies` of the pair when the caller has made them already.
    Keys: fixed, moving, overlap {header, prealigned: None}, ratios, suggested_working_spacing_mm, seconds.
    :func:`finish_diagnosis` adds the overlap under a pre-alignment, the advice and the verdict.
    """
    started = time.perf_counter()
    settings = rules()
    check_3d(fixed, moving)
    fixed_work, moving_work = work or working_copies(fixed, moving)
    return {
        "fixed": describe(fixed, "fixed", settings, fixed_work),
        "moving": describe(moving, "moving", settings, moving_work),
        "overlap": {"header": alignment_summary(fixed, moving, transforms.identity(), "header", settings),
                    "prealigned": None},
        "ratios": image_space.ratios(fixed, moving),
        "suggested_working_spacing_mm": suggested_working_spacing(fixed, moving, settings),
        "seconds": round(time.perf_counter() - started, 2),
    }


def finish_diagnosis(diagnostics: dict, fixed: sitk.Image, moving: sitk.Image,
                     prealigned_fixed_to_moving: sitk.Transform | None = None, prealign_method: str | None = None,
                     warnings: list | None = None) -> dict:
    """Complete :func:`diagnose_images`' dict (in place; also returned) after pre-alignment.

    Adds ``overlap.prealigned`` under ``prealigned_fixed_to_moving`` (fixed->moving, LPS mm; None or a
    ``header``/``none`` method: left None), then advice, verdict_code, verdict, the pre-alignment's
    ``warnings`` and ``seconds`` (both parts' time).
    """
    started = time.perf_counter()
    settings = rules()
    out = diagnostics
    images_seconds = out.pop("seconds", 0.0)
    if prealigned_fixed_to_moving is not None and prealign_method not in ("header", "none"):
        out["overlap"]["prealigned"] = alignment_summary(fixed, moving, prealigned_fixed_to_moving,
                                                         prealign_method or "given", settings)
    advice, code, verdict = advise(out, settings)
    out["advice"] = advice
    out["verdict_code"] = code
    out["verdict"] = verdict
    out["warnings"] = list(warnings or [])
    out["seconds"] = round(images_seconds + time.perf_counter() - started, 2)
    return out


def diagnose_pair(fixed: sitk.Image, moving: sitk.Image, prealigned_fixed_to_moving: sitk.Transform | None = None,
                  prealign_method: str | None = None, warnings: list | None = None) -> dict:
    """Diagnostics of a fixed/moving pair with advice (JSON-ready dict): :func:`diagnose_images` then
    :func:`finish_diagnosis`.

    ``prealigned_fixed_to_moving`` (fixed->moving, LPS mm) is the best available pre-alignment (None: the
    headers only); ``prealign_method`` names it. Nothing is pre-aligned here: the caller runs the method
    (the CLI's ``diagnose`` runs it on :func:`working_copies`, see :mod:`pipeline.diagnosis`). ``warnings``:
    the pre-alignment's.
    Keys: fixed, moving, overlap {header, prealigned}, ratios, suggested_working_spacing_mm, advice,
    verdict_code, verdict, warnings, seconds.
    """
    return finish_diagnosis(diagnose_images(fixed, moving), fixed, moving, prealigned_fixed_to_moving,
                            prealign_method, warnings)


# ------------------------------------------------------------------------------------------ advice


def _name(d: dict, role: str) -> str:
    """'the fixed CT', 'the moving MR', 'the fixed image' (modality unknown)."""
    guess = d[role]["modality"]["guess"]
    return f"the {role} {guess}" if guess != "unknown" else f"the {role} image"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


def _coverage_advice(d: dict, settings: dict) -> tuple[list, bool]:
    """Partial field of view: along which axes one image covers much less than the other."""
    fixed_extent = np.asarray(d["fixed"]["extent_mm_lps"])
    moving_extent = np.asarray(d["moving"]["extent_mm_lps"])
    advice, partial = [], False
    for axis in range(3):
        small, large = sorted((fixed_extent[axis], moving_extent[axis]))
        ratio = small / max(large, 1e-9)
        if ratio < settings["coverage_ratio_crop"]:
            partial = True
            smaller, larger = ("moving", "fixed") if moving_extent[axis] < fixed_extent[axis] else ("fixed", "moving")
            advice.append(f"{_cap(_name(d, smaller))} covers {_pct(ratio)} of {_name(d, larger)}'s "
                          f"{AXIS_NAMES[axis]} extent ({small:.0f} of {large:.0f} mm): pre-alignment and "
                          "cropping to the overlap are needed.")
    return advice, partial


def _overlap_advice(d: dict, settings: dict) -> tuple[list, dict]:
    header = d["overlap"]["header"]
    pre = d["overlap"]["prealigned"]
    smaller = "moving" if np.prod(d["moving"]["extent_mm_lps"]) <= np.prod(d["fixed"]["extent_mm_lps"]) else "fixed"
    other = "fixed" if smaller == "moving" else "moving"
    key = "moving_inside_fixed" if smaller == "moving" else "fixed_inside_moving"
    state = {"header_share": header[key], "pre_share": pre[key] if pre else None, "pre_moves": False}
    advice = []
    if header[key] <= settings["overlap_none"]:
        advice.append(f"Under the header alignment the images do not overlap (their centres are "
                      f"{header['center_distance_mm']:.0f} mm apart): the headers share no frame of reference; "
                      "pre-alignment is required.")
    elif header[key] < settings["overlap_poor"]:
        advice.append(f"Under the header alignment only {_pct(header[key])} of {_name(d, smaller)} lies inside "
                      f"{_name(d, other)}: do not trust the headers; pre-align.")
    if pre is not None:
        moves = pre.get("mean_displacement_mm", 0.0) > settings["prealign_moves_mm"] or \
            pre.get("rotation_deg", 0.0) > settings["prealign_rotates_deg"]
        state["pre_moves"] = moves
        text = (f"The '{pre['method']}' pre-alignment puts {_pct(pre[key])} of {_name(d, smaller)} inside "
                f"{_name(d, other)} (header alignment: {_pct(header[key])})")
        if moves:
            text += (f"; it displaces points by {pre.get('mean_displacement_mm', 0):.0f} mm on average and "
                     f"rotates by {pre.get('rotation_deg', 0):.0f} degrees relative to the headers, so the headers "
                     "do not align the images: keep pre-alignment on")
        advice.append(text + ".")
        if pre[key] < settings["overlap_poor"]:
            advice.append(f"Even after pre-alignment only {_pct(pre[key])} of {_name(d, smaller)} overlaps "
                          f"{_name(d, other)}: check that both images show the same body region, or give label "
                          "maps (--fixed-labels/--moving-labels) for anatomy-based pre-alignment.")
    return advice, state


def _spacing_advice(d: dict, settings: dict) -> list:
    advice = []
    ratio = d["ratios"]["voxel_volume_ratio_moving_over_fixed"]
    factor = max(ratio, 1.0 / max(ratio, 1e-12))
    spacing = d["suggested_working_spacing_mm"]
    if factor >= settings["voxel_volume_ratio_warn"]:
        advice.append(f"Voxel volume differs {factor:.0f}x ({d['fixed']['voxel_volume_mm3']:.3g} mm3 fixed vs "
                      f"{d['moving']['voxel_volume_mm3']:.3g} mm3 moving): register at a working spacing of about "
                      f"{spacing:g} mm.")
    per_axis = d["ratios"]["spacing_ratio_moving_over_fixed"]
    for axis, r in enumerate(per_axis):
        if max(r, 1.0 / r) >= settings["spacing_ratio_warn"] and factor < settings["voxel_volume_ratio_warn"]:
            advice.append(f"Along {AXIS_NAMES[axis]} the voxels differ {max(r, 1.0 / r):.1f}x in size: register at "
                          f"a working spacing of about {spacing:g} mm.")
    for role in ("fixed", "moving"):
        s = np.asarray(d[role]["spacing_mm"])
        if s.max() / s.min() >= settings["anisotropy_warn"]:
            advice.append(f"{_cap(_name(d, role))} has {s.max():.3g} mm between slices but {s.min():.3g} mm "
                          "pixels: expect less accuracy across its slices; isotropic working voxels "
                          "(the default) avoid biasing the metric.")
    return advice


def _position_advice(d: dict) -> list:
    fixed, moving = d["fixed"]["patient_position"], d["moving"]["patient_position"]
    if not fixed or not moving or fixed == moving:
        return []
    advice = []
    f_dir, m_dir = fixed[:2].upper(), moving[:2].upper()
    f_lie, m_lie = fixed[2:].upper(), moving[2:].upper()
    if f_dir != m_dir and f_dir in POSITION_NAMES and m_dir in POSITION_NAMES:
        advice.append(f"The fixed scan was taken {POSITION_NAMES[f_dir]} ({fixed}) and the moving one "
                      f"{POSITION_NAMES[m_dir]} ({moving}): expect a 180 degree rotation about the "
                      "anterior-posterior axis if either position was entered wrongly at the scanner (common for "
                      "phantoms and specimens); DICOM coordinates follow the patient, so for correctly entered "
                      "patients nothing changes. Use a pre-alignment that tries rotations (search).")
    if f_lie != m_lie and f_lie in LIE_NAMES and m_lie in LIE_NAMES:
        advice.append(f"The fixed scan was taken {LIE_NAMES[f_lie]} ({fixed}) and the moving one {LIE_NAMES[m_lie]} "
                      f"({moving}): the body lies differently, so expect a large rotation and soft-tissue deformation; "
                      "rigid registration aligns bones only roughly.")
    return advice


def _image_advice(d: dict, settings: dict) -> list:
    advice = []
    f_plane, m_plane = d["fixed"]["orientation"]["slice_plane"], d["moving"]["orientation"]["slice_plane"]
    if f_plane != m_plane:
        advice.append(f"The fixed image is stored as {f_plane} slices and the moving as {m_plane} slices: the "
                      "registration works in physical space, so no action is needed.")
    for role in ("fixed", "moving"):
        info = d[role]
        if info["orientation"]["oblique_deg"] > 10:
            advice.append(f"{_cap(_name(d, role))} is oblique ({info['orientation']['oblique_deg']:.0f} "
                          "degrees off the patient axes): fine for registration; its box overlap is approximate.")
        fg = info["foreground"]
        if fg["fraction"] < settings["foreground_min_fraction"]:
            advice.append(f"Only {100 * fg['fraction']:.1f}% of {_name(d, role)} is foreground: check that it is the "
                          "right image and not mostly empty.")
        else:
            cut = [AXIS_NAMES[a] for a in range(3)
                   if fg["extent_mm_lps"][a] >= settings["foreground_fills_axis"] * info["extent_mm_lps"][a]]
            if cut:
                advice.append(f"The object in {_name(d, role)} reaches the edges of its field of view along "
                              f"{' and '.join(cut)}: it is cut off there (partial field of view).")
        if info["modality"]["guess"] == "unknown":
            advice.append(f"The modality of {_name(d, role)} could not be told from its intensities "
                          f"({info['intensity']['min']:g} to {info['intensity']['max']:g}).")
    guesses = {d["fixed"]["modality"]["guess"], d["moving"]["modality"]["guess"]}
    if guesses == {"CT", "MR"}:
        advice.append("CT and MR: intensities do not correspond, so the metric must be mutual information "
                      "(the default of both engines).")
    return advice


def _plausibility_advice(d: dict, settings: dict) -> tuple[list, list]:
    """(implausible inputs: different units, sizes or voxel sizes no scan has, a patch, noise; header notes)."""
    limits = plausibility.content_limits()
    advice, notes = [], []
    units = plausibility.units_finding(d["fixed"], d["moving"], float(settings.get("units_ratio_advice", 20.0)),
                                       limits)
    if units:
        advice.append(f"{_cap(units)}; correct the voxel size in that header before registering.")
    for role in ("fixed", "moving"):
        info = d[role]
        summary = {"extent_mm_lps": info["extent_mm_lps"], "size": info["size"], "spacing_mm": info["spacing_mm"],
                   "structure": info.get("structure")}
        for _status, text in plausibility.content_findings(summary, _name(d, role), limits):
            advice.append(_cap(text) + ".")
        for note in info.get("header_notes") or []:
            notes.append(f"The header of {_name(d, role)}: {note}.")
    return advice, notes


def advise(d: dict, settings: dict | None = None) -> tuple[list, str, str]:
    """(advice sentences, verdict code, verdict sentence) from the numbers in a diagnostics dict."""
    settings = settings or rules()
    coverage, partial = _coverage_advice(d, settings)
    overlap, state = _overlap_advice(d, settings)
    implausible, notes = _plausibility_advice(d, settings)
    advice = (implausible + notes + coverage + overlap + _position_advice(d) + _spacing_advice(d, settings)
              + _image_advice(d, settings))
    best = state["pre_share"] if state["pre_share"] is not None else state["header_share"]
    headers_bad = state["header_share"] < settings["header_overlap_good"] or state["pre_moves"] or \
        bool(_position_advice(d))
    if implausible:
        code = "check_inputs"
        verdict = "Check the inputs first: " + implausible[0][:1].lower() + implausible[0][1:]
    elif best <= settings["overlap_none"]:
        code = "no_overlap"
        verdict = ("Not registrable as is: the images do not overlap even after pre-alignment; check that they "
                   "show the same region, or pre-align by hand / with label maps.")
    elif partial:
        code = "prealign_and_crop"
        verdict = "Pre-alignment and cropping to the overlap are needed (partial field of view)."
    elif headers_bad:
        code = "prealign"
        verdict = "Pre-alignment is needed: the headers do not bring the images together."
    else:
        code = "ready"
        verdict = ("The headers already overlap the images well; registration can start from them "
                   "(overlap alone does not prove alignment: check the result).")
    return advice, code, verdict


# ------------------------------------------------------------------------------------------ text and CLI


def _fmt(values, digits: int = 1, sep: str = " x ") -> str:
    return sep.join(f"{v:.{digits}f}" for v in values)


def format_diagnostics(d: dict) -> str:
    """Plain-text report of a ``diagnose_pair`` dict: a two-column table, overlaps, ratios, advice, verdict."""
    f, m = d["fixed"], d["moving"]

    def row(label, fv, mv):
        return f"  {label:28s} {fv:34s} {mv}"

    lines = ["Pair diagnostics (physical LPS mm; L = left-right, P = anterior-posterior, S = head-feet)",
             row("", "fixed", "moving")]
    lines.append(row("modality guess", _modality_text(f), _modality_text(m)))
    lines.append(row("size (voxels)", " x ".join(map(str, f["size"])), " x ".join(map(str, m["size"]))))
    lines.append(row("spacing (mm, i x j x k)", _fmt(f["spacing_mm"], 3), _fmt(m["spacing_mm"], 3)))
    lines.append(row("extent L x P x S (mm)", _fmt(f["extent_mm_lps"]), _fmt(m["extent_mm_lps"])))
    lines.append(row("orientation", _orientation_text(f), _orientation_text(m)))
    lines.append(row("patient position", f["patient_position"] or "unknown", m["patient_position"] or "unknown"))
    lines.append(row("intensity min..max", _range_text(f["intensity"]), _range_text(m["intensity"])))
    lines.append(row("intensity p1..p99", f"{f['intensity']['p1']:g}..{f['intensity']['p99']:g}",
                     f"{m['intensity']['p1']:g}..{m['intensity']['p99']:g}"))
    lines.append(row("foreground", _fg_text(f["foreground"]), _fg_text(m["foreground"])))
    r = d["ratios"]
    lines.append("Ratios moving/fixed along L, P, S:")
    lines.append(f"  extent {_fmt(r['extent_ratio_moving_over_fixed'], 2, ', ')}; spacing "
                 f"{_fmt(r['spacing_ratio_moving_over_fixed'], 2, ', ')}; voxel volume "
                 f"{r['voxel_volume_ratio_moving_over_fixed']:.3g}; suggested working spacing "
                 f"{d['suggested_working_spacing_mm']:g} mm")
    lines.append("Overlap (share of each image inside the other):")
    for key in ("header", "prealigned"):
        a = d["overlap"].get(key)
        if a is None:
            continue
        text = (f"  {a['method']:10s} fixed inside moving {_pct(a['fixed_inside_moving']):>4s}, moving inside fixed "
                f"{_pct(a['moving_inside_fixed']):>4s}, centres {a['center_distance_mm']:.0f} mm apart")
        if key == "prealigned" and "rotation_deg" in a:
            text += f" (moves {a['mean_displacement_mm']:.0f} mm, rotates {a['rotation_deg']:.0f} deg vs header)"
        lines.append(text)
        if a.get("per_axis"):
            lines.append(f"  {'':10s} per axis L, P, S: fixed covered "
                         f"{', '.join(_pct(v) for v in a['per_axis']['fixed_covered'])}; moving covered "
                         f"{', '.join(_pct(v) for v in a['per_axis']['moving_covered'])}")
    lines.append("Advice:")
    lines.extend(f"  - {sentence}" for sentence in d["advice"] or ["nothing to add."])
    for warning in d.get("warnings", []):
        lines.append(f"  warning: {warning}")
    lines.append(f"Verdict: {d['verdict']}")
    return "\n".join(lines)


def _modality_text(info: dict) -> str:
    guess = info["modality"]
    return f"{guess['guess']} (from {'intensities' if guess['source'] == 'intensities' else 'DICOM tag'})"


def _orientation_text(info: dict) -> str:
    o = info["orientation"]
    text = f"{o['slice_plane']}, axes to {o['axes_point_to']}"
    return text + (f", oblique {o['oblique_deg']:.0f} deg" if o["oblique_deg"] > 1 else "")


def _range_text(intensity: dict) -> str:
    text = f"{intensity['min']:g}..{intensity['max']:g}"
    if intensity.get("padding_value") is not None:
        text += f" (padding {intensity['padding_value']:g})"
    return text


def _fg_text(fg: dict) -> str:
    return f"{100 * fg['fraction']:.0f}% ({fg['volume_ml']:.0f} ml; {_fmt(fg['extent_mm_lps'], 0)} mm)"
