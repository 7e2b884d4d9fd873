"""Synthetic phantoms with exact transforms (fixed->moving, physical LPS mm), for the demo, the tests and the
benchmarks (not a pipeline stage)."""
