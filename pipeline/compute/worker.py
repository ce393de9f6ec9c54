"""What fcnpipe installs on a Dask worker: the model, sent once and kept loaded.

This module imports distributed, so only a run on a Dask cluster imports it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import WorkerPlugin

if TYPE_CHECKING:
    from pipeline.compute.job import Job


class ModelPlugin(WorkerPlugin):  # type: ignore[misc]
    """Carries the model file's bytes to each worker, including workers that join later; the worker
    loads the network from them once and keeps it for every task of the job (``predictor_for``)."""

    def __init__(self, job: Job, data: bytes) -> None:
        self.job = job
        self.data = data

    def setup(self, worker: Any) -> None:
        from pipeline.compute.state import adopt_model
        from pipeline.model.checkpoint import load_model
        from pipeline.model.predictor import set_torch_threads

        folder = getattr(worker, "local_directory", None) or os.getcwd()
        suffix = os.path.splitext(self.job.model_path)[1]
        path = os.path.join(folder, f"fcnpipe-model-{self.job.model_sha256[:16]}{suffix}")
        with open(path, "wb") as file:
            file.write(self.data)
        set_torch_threads(self.job.torch_threads)
        adopt_model(self.job, load_model(path, self.job.model_factory).module)
