"""shapee.benchmarks."""
