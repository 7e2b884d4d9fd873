"""Synthetic phantoms with exact transforms, for the demo, the tests and the benchmarks (not a pipeline stage)."""
