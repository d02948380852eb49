"""Batch-level mixing (MixUp, CutMix) for targets torchvision's v2.MixUp / v2.CutMix do not support."""
