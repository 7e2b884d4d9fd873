"""How fast is DICOM series inspection (headers only) and reconstruction on a large series?

Writes a synthetic CT series (default 500 slices of 512 x 512, uint16 with RescaleIntercept) into a
temporary folder with pydicom, then times:
  - ``inspect_dicom`` (headers only: grouping, checks, geometry),
  - ``read_dicom_volume`` (inspection + pixel data with pydicom),
  - SimpleITK's GDCM series reader on the same files, for comparison.
The issue's target: header parsing of a 500-slice series under 2 s.

Usage: python benchmarks/dicom_header_speed.py [--slices 500] [--size 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MultimodalPrealign"))
sys.path.insert(0, str(ROOT / "Testing"))

from dicom_synth import axial_positions, write_series

from MultimodalPrealignLib.io import dicom_series


def best_of(repeat: int, function) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--size", type=int, default=512, help="rows = columns")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "series"
        started = time.perf_counter()
        write_series(folder, axial_positions((-250.0, -250.0, -400.0), 0.8, args.slices),
                     rows=args.size, columns=args.size, pixel_spacing=(0.97, 0.97))
        written = time.perf_counter() - started
        inspection = dicom_series.inspect_dicom(folder)
        assert inspection.selection.volume is not None, inspection.selection.reason
        headers = best_of(args.repeat, lambda: dicom_series.inspect_dicom(folder))
        volume = best_of(1, lambda: dicom_series.read_dicom_volume(folder))

        def gdcm():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
            reader.Execute()

        gdcm_time = best_of(1, gdcm)
    rows = [
        ("write series (pydicom, setup)", written),
        ("inspect_dicom (headers only)", headers),
        ("read_dicom_volume (headers + pixels)", volume),
        ("SimpleITK GDCM series reader", gdcm_time),
    ]
    print(f"DICOM series of {args.slices} slices, {args.size} x {args.size} (best of {args.repeat} for headers)")
    print(f"{'step':40s} {'seconds':>8s}")
    for name, seconds in rows:
        print(f"{name:40s} {seconds:8.2f}")
    target = 2.0
    print(f"header parsing {'meets' if headers < target else 'MISSES'} the {target:.0f} s target")
    return 0 if headers < target else 1


if __name__ == "__main__":
    sys.exit(main())
