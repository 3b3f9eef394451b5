"""GPU benchmarks: `python -m benchmarks.run --suite NAME` writes JSON."""
