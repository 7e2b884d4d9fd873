"""Prove the result: metrics before/after (``measure``, ``metrics``), the verdict, pictures, report.html.
QA measures and judges; it never runs a stage again (the pipeline owns attempts and fallback)."""
