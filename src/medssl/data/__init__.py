"""Training data: shard streaming and multi-crop medical augmentation."""
