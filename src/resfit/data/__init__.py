"""Data: paths, discovery and manifests, decoding, fingerprints, sources, shards, augmentation
and preprocessing.
"""
