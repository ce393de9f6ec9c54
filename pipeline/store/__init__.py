"""The output store, its only writer and its one reader; owns zarr and numcodecs.

Names and encodings (:mod:`~pipeline.store.layout`), arrays and chunks, the typed record, pyramid
reductions, viewer and GIS metadata, and the lock, staging and markers that keep a store whole.
"""
