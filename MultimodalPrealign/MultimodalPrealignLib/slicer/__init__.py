"""The Slicer side: MRML nodes <-> SimpleITK (``mrml_bridge``) and Slicer's own tools (``tools``: CropVolume,
BRAINSFit, SlicerElastix, TotalSegmentator). The only part of the core that imports slicer, qt, vtk or ctk
(lazily, inside functions)."""
