"""Making networks and checking them.

Labelled patches from TIFF pairs, training, the synthetic slide, and the demo that runs the whole
job on it.
"""
