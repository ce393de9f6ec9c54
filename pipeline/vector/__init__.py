"""Vectors: seam-free polygons of the label map, and statistics per region of the user's polygons.

Polygons go to QuPath GeoJSON, GeoPackage or FlatGeobuf; the user's regions come from the same. The
only package that imports shapely and pyogrio.
"""
