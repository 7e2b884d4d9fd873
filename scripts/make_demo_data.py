"""Derive the embedded demo pair from the MRI-DIR porcine phantom (CC BY 4.0).

Usage: python scripts/make_demo_data.py [../shared/data/mridir-phantom]
Writes MultimodalPrealign/MultimodalPrealignLib/data/demo/{ct_demo.nrrd, mr_demo.nrrd}: both images
downsampled (anti-aliased) to about 2 mm voxels, geometry frames unchanged (so the demo keeps the real
problem: no shared frame of reference and a ~180 degree flip), stored as int16 gzip NRRD.
"""

from __future__ import annotations

import sys
from pathlib import Path

import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MultimodalPrealign"))

from MultimodalPrealignLib.crop import background_value  # noqa: E402
from MultimodalPrealignLib.geometry.resample import resample_to_spacing  # noqa: E402

TARGETS = {"ct.nrrd": ("ct_demo.nrrd", (2.0, 2.0, 2.0)), "mr_t2.nrrd": ("mr_demo.nrrd", (2.0, 2.0, 2.5))}


def main() -> int:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / "shared" / "data" / "mridir-phantom"
    out = REPO / "MultimodalPrealign" / "MultimodalPrealignLib" / "data" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    for name, (target, spacing) in TARGETS.items():
        image = sitk.ReadImage(str(source / name))
        small = resample_to_spacing(image, spacing, default_value=background_value(image))
        small = sitk.Cast(sitk.Round(small), sitk.sitkInt16)
        sitk.WriteImage(small, str(out / target), True)
        print(f"{name}: {image.GetSize()} @ {image.GetSpacing()} -> {target}: {small.GetSize()} @ {small.GetSpacing()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
