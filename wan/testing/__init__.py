"""Test support, shared by the tests, the benchmarks and the built-in tiny task: tiny models written in the official
layout, and one rule for drawing realistic random weights. Nothing in the pipeline imports this package."""
