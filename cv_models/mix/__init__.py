"""Batch-level mixing (MixUp, CutMix, Mosaic, copy-paste) for the tasks torchvision's v2.MixUp/CutMix do not cover."""
