"""A no-op Flower App for side-by-side round benchmarks."""
