"""One-off investigations behind a design decision or a documented figure
(see benchmarks/README.md)."""
