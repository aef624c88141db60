"""Scripts that print side-by-side measurements; run them from the repository root with
`python -m benchmarks.<name>`. They are not tests."""
