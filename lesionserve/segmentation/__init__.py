"""Lesion segmentation: the U-Net segmenter (seed 004's system), declared once in ``spec``, with its
data, recipe and training (``train``), metrics (``metrics``), post-processing (``postprocess``,
shared by the reference and the served step) and evaluation (``evaluate``)."""
