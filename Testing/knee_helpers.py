"""The small synthetic knee of the per-structure tests, and a global transform near its femur."""

from __future__ import annotations

from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.synthetic import knee
from MultimodalPrealignLib.synthetic.phantoms import rigid_transform, rotation_about_axis


def small_knee(fixed_spacing_mm: float, fixed_size: int):
    """A microCT-like joint (``fixed_size``^3 voxels of ``fixed_spacing_mm``) vs a 3 x 1 x 1 mm MR-like leg, 12
    degrees more flexion in the MR."""
    return knee.make_knee_pair(seed=2, fixed_spacing_mm=fixed_spacing_mm, fixed_size=fixed_size,
                               moving_spacing=(3.0, 1.0, 1.0), flexion_fixed_deg=5.0, flexion_difference_deg=12.0,
                               placement_rotation_deg=10.0, placement_translation_mm=20.0, flip=False,
                               moving_supersample=(2, 1, 1))


def near_femur(pair):
    """A global transform near the femur's truth (2 degrees, 1.5 mm off): the tibia and patella are far off."""
    centre = knee.bone_points(pair, "femur", 500, seed=0).mean(0)
    nudge = rigid_transform(rotation_about_axis([1.0, 2.0, 0.5], 2.0), [1.0, -1.0, 0.5], centre)
    return transforms.compose(nudge, pair.truths["femur"])


def bone_error(pair, transform, bone: str) -> float:
    """Mean error (mm) of a fixed->moving transform on the bone's points against its truth."""
    return transforms.mean_point_error(transform, pair.truths[bone], knee.bone_points(pair, bone, 800, seed=1))
