"""Tasks: what the network's outputs mean (single-label, multi-label): loss, metrics,
probabilities, calibration.
"""
