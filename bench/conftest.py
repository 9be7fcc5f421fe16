"""Benchmarks state the settings they run under: threads, allocator, backend."""

import os

import torch


def pytest_report_header(config):
    import slimops

    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    return [
        f"slimops backends: {slimops.backend_info()}",
        f"torch threads: {torch.get_num_threads()}; allocator: "
        f"{malloc or 'glibc defaults (large buffers go back to the OS: set MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ to change)'}",
    ]
