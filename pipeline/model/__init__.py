"""The network; owns PyTorch.

What a model file holds (:mod:`~pipeline.model.network`, :mod:`~pipeline.model.checkpoint`), its
measured stride and receptive radius, forward passes (:mod:`~pipeline.model.predictor`), deeper FCNs
and fitting. The rest of fcnpipe sees numpy arrays and frozen descriptions.
"""
