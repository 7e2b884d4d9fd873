"""The embedded demo pair in Slicer's Sample Data module (category "Multimodal Prealign")."""

from __future__ import annotations

import os

#: The embedded demo pair (scripts/make_demo_data.py: MRI-DIR porcine phantom, CC BY 4.0, downsampled):
#: node name -> file in MultimodalPrealignLib/data/demo.
DEMO_FILES = {"MultimodalPrealignDemoCT": "ct_demo.nrrd", "MultimodalPrealignDemoMR": "mr_demo.nrrd"}


def register_demo_pair(module_dir: str) -> None:
    """Register the demo pair (CT fixed + T2 MR moving of the MRI-DIR porcine phantom) with Sample Data.

    ``module_dir``: the folder of MultimodalPrealign.py (it holds MultimodalPrealignLib/ and Resources/).
    Files that are absent (demo data not generated) are skipped.
    """
    import qt
    import SampleData

    demo_dir = os.path.join(module_dir, "MultimodalPrealignLib", "data", "demo")
    icon = os.path.join(module_dir, "Resources", "Icons", "MultimodalPrealign.png")
    for node_name, file_name in DEMO_FILES.items():
        path = os.path.join(demo_dir, file_name)
        if not os.path.exists(path):
            continue
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="Multimodal Prealign",
            sampleName=node_name,
            thumbnailFileName=icon,
            uris=qt.QUrl.fromLocalFile(path).toString(),
            fileNames=file_name,
            nodeNames=node_name,
        )
