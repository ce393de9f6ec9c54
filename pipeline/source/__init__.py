"""Reading the input, window by window; owns tifffile and imagecodecs.

TIFF structure and metadata (:mod:`~pipeline.source.tiff`), pixels (:mod:`~pipeline.source.pixels`),
resampling to a requested resolution, georeference, and which chunks hold foreground
(:mod:`~pipeline.source.mask`).
"""
