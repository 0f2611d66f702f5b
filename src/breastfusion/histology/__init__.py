"""Histopathology: stain normalisation and augmentation, whole-slide reading and tiling, BreakHis import."""
