"""What is made from a finished store; owns rasterio and Pillow.

TIFF exports (a COG for GIS, an OME-TIFF for slide viewers) and the PNG preview.
"""
