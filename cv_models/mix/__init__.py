"""Batch-level mixing (MixUp, CutMix, Mosaic, copy-paste) for targets torchvision's v2.MixUp / v2.CutMix do not cover."""
