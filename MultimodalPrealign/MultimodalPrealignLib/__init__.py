"""MultimodalPrealign core: diagnose, pre-align, crop, register and check CT/MR pairs.

Importable without ``slicer`` or ``qt``. Every transform in this package maps a point in the
FIXED image's physical space to the MOVING image's physical space (ITK's resampling convention),
in LPS millimetres, unless a name or docstring says otherwise.
"""


__version__ = "0.1.0"
