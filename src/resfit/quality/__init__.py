"""Data quality: leakage between splits, label issues, the k-fold audit."""
