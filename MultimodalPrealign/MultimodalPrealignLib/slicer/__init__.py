"""The Slicer side: the only part of the core that imports slicer, qt, vtk or ctk (lazily, inside functions).

- ``mrml_bridge``: MRML nodes <-> SimpleITK (volumes, transforms, ROIs, segmentations -> label maps).
- Slicer's own tools: ``crop_volume`` (CropVolume), ``brainsfit`` (BRAINSFit CLI), ``elastix`` (SlicerElastix),
  ``totalsegmentator`` (TotalSegmentator); ``engine_run`` runs the core's pipeline with them as its crop and
  register steps.
- The module's run on MRML nodes: ``run_steps`` (check and read the inputs, place the result, quality check),
  ``quality_check`` (verdict, metrics table node, report folder).
- The panel: ``pair_diagnostics``, ``result_panel`` (verdict line, thumbnails, Quality check section), ``views``
  (slice views); ``python_requirements``, ``sample_data``, ``self_test``.

Slicer loads MultimodalPrealign.py, which imports these modules, before ``python_requirements`` has installed
scipy: at module level they import only core modules that need neither scipy nor pydicom (errors, geometry's
transforms and image_space, resource_files); diagnose, io, engines, crop, qa and pipeline are imported inside
functions.
"""
