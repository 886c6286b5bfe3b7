"""Dominant-portion masks (OFFSET's segmentation step): sources, the per-dataset cache, IoU, and how
masks reach a model with its images."""
