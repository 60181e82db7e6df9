"""Applications on top of the library: serve, tune, benchmark, analysis, demo."""
