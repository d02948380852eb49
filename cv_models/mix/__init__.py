"""Batch-level mixing augmentations torchvision does not offer for boxes and masks (written by hand)."""
