"""Benchmarks a user can run on their own machine (`resfit bench`)."""
