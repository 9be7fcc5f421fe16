"""Triton GPU kernels of the slimops ops (installed as ``slimops.kernels``).

Empty for now: CUDA tensors run on the reference path until the Triton kernels land
(see ``slimops.backend_info()``).
"""
