"""Models: the ResNet family, weights, adapters and transfer learning (freezing, feature cache)."""
