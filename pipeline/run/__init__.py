"""One run, start to end, and many as a batch.

The frozen plan (:mod:`~pipeline.run.plan`), what it will cost, whether a store may be resumed, and
executing it into a store (:mod:`~pipeline.run.execute`).
"""
