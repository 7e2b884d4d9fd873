"""Read and check inputs: images and DICOM series, label maps (TotalSegmentator, Slicer segmentations),
landmarks. Nothing here imports a later stage."""
