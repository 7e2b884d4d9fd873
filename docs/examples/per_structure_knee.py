"""The worked example of docs/per_structure.md: a synthetic knee, one transform per bone, each scored against its truth.

    python docs/examples/per_structure_knee.py OUT [--images docs/images]

Makes a microCT-like image of the joint (200^3 voxels of 0.25 mm) and an MR-like image of the leg (0.45 x 0.45 mm
in-plane, 2.5 mm slices, 180 mm) with the knee bent 20 degrees further, writes them with the bones' segmentation
into OUT, gives the MR header a rough alignment (the femur's truth off by 5 degrees and 4.8 mm, as a transform
moved by hand in Slicer gives), runs

    multimodal-prealign register --fixed OUT/microct.nrrd --moving OUT/mr.nrrd --out OUT/result \
        --prealign header --fixed-labels OUT/bones.seg.nrrd --per-structure femur,tibia,patella

and prints each bone's mean error (mm) under the rough start, the global result and its own transform. With
``--images DIR`` the composite pictures and the tibia's checkerboards are copied there under the names the docs use.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MultimodalPrealignLib import cli
from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.synthetic import knee
from MultimodalPrealignLib.synthetic.phantoms import rigid_transform, rotation_about_axis

BONES = ("femur", "tibia", "patella")
#: docs/images name <- file in the result folder
PICTURES = {"per_structure_composite_global.png": "structures/composite_global.png",
            "per_structure_composite_structures.png": "structures/composite_structures.png",
            "per_structure_tibia_global.png": "structures/tibia/checkerboard_global.png",
            "per_structure_tibia_structure.png": "structures/tibia/checkerboard_structure.png"}


def make_inputs(out: Path):
    """Write microct.nrrd, mr.nrrd (header moved by the rough start) and bones.seg.nrrd; return (pair, start)."""
    pair = knee.make_knee_pair(seed=7, fixed_spacing_mm=0.25, fixed_size=200, moving_spacing=(2.5, 0.45, 0.45),
                               moving_extent_mm=(120.0, 140.0, 180.0), flexion_difference_deg=20.0)
    centre = knee.bone_points(pair, "femur", 2000, seed=0).mean(0)
    nudge = rigid_transform(rotation_about_axis([1.0, 1.0, 0.3], 5.0), [3.0, -3.0, 2.4], centre)
    start = transforms.to_matrix(pair.truths["femur"]) @ transforms.to_matrix(nudge)  # fixed -> true MR
    moved = sitk.Image(pair.moving)  # the MR header moved by start^-1: identity (--prealign header) = start
    inverse = np.linalg.inv(start)
    moved.SetOrigin((inverse[:3, :3] @ np.asarray(pair.moving.GetOrigin()) + inverse[:3, 3]).tolist())
    moved.SetDirection((inverse[:3, :3] @ np.asarray(pair.moving.GetDirection()).reshape(3, 3)).ravel().tolist())
    out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(pair.fixed, str(out / "microct.nrrd"), True)
    sitk.WriteImage(moved, str(out / "mr.nrrd"), True)
    sitk.WriteImage(pair.fixed_labels, str(out / "bones.seg.nrrd"), True)
    return pair, start


def bone_error(pair, start: np.ndarray, fixed_to_moved, bone: str) -> float:
    """Mean error (mm) of a fixed -> moved-MR transform against the bone's truth (fixed -> true MR)."""
    matrix = start @ transforms.to_matrix(fixed_to_moved)
    points = knee.bone_points(pair, bone, 2000, seed=1)
    return transforms.mean_point_error(transforms.affine_from_matrix(matrix), pair.truths[bone], points)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=Path, default=None, help="copy the pictures the docs show here")
    args = parser.parse_args(argv)
    pair, start = make_inputs(args.out)
    result = args.out / "result"
    shutil.rmtree(result, ignore_errors=True)
    started = time.perf_counter()
    code = cli.main(["register", "--fixed", str(args.out / "microct.nrrd"), "--moving", str(args.out / "mr.nrrd"),
                     "--out", str(result), "--prealign", "header", "--fixed-labels",
                     str(args.out / "bones.seg.nrrd"), "--per-structure", ",".join(BONES)])
    seconds = time.perf_counter() - started
    if code not in (0, 4):
        return code
    report = json.loads((result / "report.json").read_text())
    entries = {e["name"]: e for e in report["structures"]["results"]}
    rows = {"the rough start (header)": {b: bone_error(pair, start, transforms.identity(), b) for b in BONES},
            "the global result (`transform.h5`)": {
                b: bone_error(pair, start, transforms.read_transform(result / "transform.h5"), b) for b in BONES},
            "each structure's own (`structures/<name>/transform.h5`)": {
                b: bone_error(pair, start, transforms.read_transform(result / entries[b]["files"]["transform"]), b)
                for b in BONES}}
    print("\n| transform | " + " | ".join(BONES) + " |\n|---|" + "---|" * len(BONES))
    for label, errors in rows.items():
        cells = [f"{errors[b]:.2f}" + (f" ({entries[b]['verdict']})" if label.startswith("each") else "")
                 for b in BONES]
        print(f"| {label} | " + " | ".join(cells) + " |")
    timings = report["timings_s"]
    print(f"\nglobal verdict {report['verdict']}; wall {seconds:.1f} s "
          f"(structures {timings.get('structures', 0):.1f} s)")
    for b in BONES:
        print(f"{b}: {entries[b]['verdict']}: {entries[b]['verdict_reasons'][0]}")
    if args.images:
        args.images.mkdir(parents=True, exist_ok=True)
        for name, source in PICTURES.items():
            shutil.copyfile(result / source, args.images / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
