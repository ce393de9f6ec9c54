"""fcnpipe: gigapixel images -> per-pixel class-probability maps with a fully convolutional network.

Data flows one way: :mod:`pipeline.source` (lazy TIFF reading) -> :mod:`pipeline.tiling` (cores and
halos) -> :mod:`pipeline.model` (the network) -> :mod:`pipeline.predict` (Dask tasks) ->
:mod:`pipeline.output` (Zarr writes) -> :mod:`pipeline.metadata` (provenance). :mod:`pipeline.run`
wires the steps; :mod:`pipeline.cli` is the only module that knows about the command line.
"""

__version__ = "0.1.0"
