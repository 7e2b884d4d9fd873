"""How well is the phantom reference determined? A second, independent similarity measure on the same pair.

The reference (``phantom_ct_to_mr_reference.tfm``) is the optimum of Mattes mutual information (elastix,
MR sampled, 1.5 mm). Here the rigid optimum of a different measure, normalized gradient fields (NGF: mean
squared cosine between the CT and MR intensity gradients, Haber & Modersitzki 2006, eps = median gradient
norm, Gaussian sigma 1.5 mm, MR object voxels on a 3 mm lattice of the 1.5 mm copies), is found with Powell's
method started at the reference, and both measures are scanned along the MR slice axis for slabs of the MR
(33 of its 94 slices) at different positions. A measure that located the object reliably would put every
slab's optimum at the same offset.

    python benchmarks/reference/phantom_reference_ngf.py          # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, optimize

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import search_benchmark as sb
from make_phantom_reference import ct_elastix_input, mr_elastix_inputs
from phantom_slab_optimum import along_axis_shift, slab_metric

from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.geometry.masks import foreground_mask
from MultimodalPrealignLib.prealign import search

SIGMA_MM = 1.5


def _gradients(image: sitk.Image) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Index-axis gradient arrays (per mm) of the smoothed image, its index->LPS matrix, origin, direction."""
    array = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, SIGMA_MM)).astype(np.float32)
    sx, sy, sz = image.GetSpacing()
    gz, gy, gx = np.gradient(array, sz, sy, sx)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return [gx, gy, gz], direction @ np.diag(image.GetSpacing()), np.asarray(image.GetOrigin()), direction


class NGF:
    """NGF of MR (fixed sample points) against the CT under a CT -> MR pose; lower is better."""

    def __init__(self, ct15: sitk.Image, mr15: sitk.Image, mask15: sitk.Image, stride: int = 2):
        self.ct_grad, index_to_lps, self.ct_origin, self.ct_direction = _gradients(ct15)
        self.lps_to_ct_index = np.linalg.inv(index_to_lps)
        mr_grad, mr_index_to_lps, mr_origin, mr_direction = _gradients(mr15)
        keep = sitk.GetArrayFromImage(mask15) > 0
        lattice = np.zeros_like(keep)
        lattice[::stride, ::stride, ::stride] = True
        keep &= lattice
        self.points = np.argwhere(keep)[:, ::-1] @ mr_index_to_lps.T + mr_origin
        self.mr_gradient = np.stack([g[keep] for g in mr_grad], 1) @ mr_direction.T
        self.eps_mr = float(np.median(np.linalg.norm(self.mr_gradient, axis=1)))
        self.eps_ct = None

    def ct_gradient_at(self, points_ct: np.ndarray) -> np.ndarray:
        coords = ((points_ct - self.ct_origin) @ self.lps_to_ct_index.T)[:, ::-1].T
        g = np.stack([ndimage.map_coordinates(a, coords, order=1, mode="constant", cval=0.0) for a in self.ct_grad], 1)
        return g @ self.ct_direction.T

    def __call__(self, ct_to_mr: np.ndarray) -> float:
        mr_to_ct = np.linalg.inv(ct_to_mr)
        gc = self.ct_gradient_at(self.points @ mr_to_ct[:3, :3].T + mr_to_ct[:3, 3])
        if self.eps_ct is None:  # fixed at the first pose evaluated, so the measure does not change during a fit
            self.eps_ct = float(np.median(np.linalg.norm(gc, axis=1)))
        gm = self.mr_gradient @ mr_to_ct[:3, :3].T
        dot = (gm * gc).sum(1)
        return -float(np.mean(dot**2 / (((gm**2).sum(1) + self.eps_mr**2) * ((gc**2).sum(1) + self.eps_ct**2))))


def rigid_fit(measure, start: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Powell over 3 rotations (degrees, about ``centre``, MR frame) and 3 translations (mm) from ``start``."""
    def pose(x):
        d = np.eye(4)
        d[:3, :3] = search.rotation_vector_matrix(np.radians(x[:3]))
        d[:3, 3] = centre + x[3:] - d[:3, :3] @ centre
        return d @ start

    result = optimize.minimize(lambda x: measure(pose(x)), np.zeros(6), method="Powell",
                               options={"xtol": 0.01, "ftol": 1e-7, "maxfev": 3000})
    return pose(result.x)


def best_offset(values: np.ndarray, shifts: np.ndarray) -> float:
    """Minimum of a sampled curve, refined by a parabola through its neighbours (mm)."""
    i = int(np.argmin(values))
    if 0 < i < len(values) - 1:
        y0, y1, y2 = values[i - 1:i + 2]
        return float(shifts[i] + 0.5 * (y0 - y2) / (y0 - 2 * y1 + y2))
    return float(shifts[i])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slab-slices", type=int, default=33)
    args = parser.parse_args(argv)
    ct = sitk.ReadImage(str(sb.DATA / "ct.nrrd"), sitk.sitkFloat32)
    mr = sitk.ReadImage(str(sb.DATA / "mr_t2.nrrd"), sitk.sitkFloat32)
    reference = transforms.to_matrix(transforms.read_transform(sb.REFERENCE))
    points = sb.phantoms.body_points(sb.object_mask(ct), n=3000, seed=0)
    ct15 = ct_elastix_input(ct)
    mr15, mask15 = mr_elastix_inputs(mr, foreground_mask(mr))
    ngf = NGF(ct15, mr15, mask15)
    fitted = rigid_fit(ngf, reference, ngf.points.mean(0))
    angle = transforms.rotation_angle_deg(np.linalg.inv(reference) @ fitted)
    print(f"NGF rigid optimum of the whole pair vs the Mattes MI reference: mean distance over the CT object "
          f"{sb.mean_error(fitted, reference, points):.2f} mm; object centre moved (CT LPS) "
          f"{along_axis_shift(fitted, reference, points)} mm, rotation {angle:.2f} deg")
    axis = np.asarray(mr.GetDirection()).reshape(3, 3)[:, 2]
    shifts = np.arange(-10.0, 10.5, 1.0)
    n_slices = mr.GetSize()[2]
    print("\n| MR slices | Mattes MI optimum along the MR slice axis (mm) | NGF optimum (mm) |\n|---|---|---|")
    slabs = [(0, n_slices)] + [(f, args.slab_slices) for f in range(0, n_slices - args.slab_slices + 1, 8)]
    for first, count in slabs:
        slab = mr[:, :, first:first + count]
        s15, m15 = mr_elastix_inputs(slab, foreground_mask(slab))
        slab_ngf = NGF(ct15, s15, m15, stride=1)
        moved = []
        for shift in shifts:
            t = np.eye(4)
            t[:3, 3] = shift * axis
            moved.append(t @ reference)
        mattes = np.array([slab_metric(s15, ct15, m15, m) for m in moved])
        gradient = np.array([slab_ngf(m) for m in moved])
        print(f"| {first}-{first + count - 1} | {best_offset(mattes, shifts):+.2f} | {best_offset(gradient, shifts):+.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
