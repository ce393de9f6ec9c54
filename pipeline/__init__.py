"""fcnpipe: gigapixel images -> per-pixel class-probability maps with a fully convolutional network.

Data flows one way, and so do the imports: :mod:`pipeline.source` reads the input, :mod:`pipeline.tiling`
cuts it into cores and halos, :mod:`pipeline.model` runs the network, :mod:`pipeline.compute` runs the
tasks, :mod:`pipeline.store` writes the Zarr store and its metadata; :mod:`pipeline.run` wires them into
one run, :mod:`pipeline.products` makes TIFFs and pictures from the store, :mod:`pipeline.training`
makes networks, and :mod:`pipeline.cli` is the only package that knows about the command line. At the
bottom, :mod:`pipeline.errors`, :mod:`pipeline.parse`, :mod:`pipeline.config` and :mod:`pipeline.files`
serve them all. ``tests/test_structure.py`` keeps it so.
"""

__version__ = "0.1.0"

import os as _os

# PyTorch's CPU allocator backs large tensors with transparent huge pages when this is set before
# torch is first imported, which makes forward passes faster (benchmarks/README.md, "Why the
# defaults"). setdefault: a user's own choice wins.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
