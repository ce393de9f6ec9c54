"""Running the tasks, here or on a cluster; owns dask and distributed.

What a task carries (:mod:`~pipeline.compute.job`), the fused read-predict-write tasks, blended
tiling, where they run (threads or Dask distributed, :mod:`~pipeline.compute.engine`) and the
per-process state of a worker (:mod:`~pipeline.compute.state`).
"""
