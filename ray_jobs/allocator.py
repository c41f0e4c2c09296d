"""The glibc allocator settings every training process runs with, set through its environment.

glibc reads them when a process starts, so they travel as environment variables: in the Ray job's
runtime environment (``ray_jobs.cluster.job_runtime_env``) for Ray's workers, and through
``ray_jobs.cli.console_main`` for the ``acodm`` process itself. No import of Ray here: the CLI uses
this before anything heavy loads.
"""

from __future__ import annotations

import os

# glibc malloc settings for a training process, read from the environment at process start. With
# glibc's self-adjusting defaults, blocks above the mmap threshold get fresh zeroed pages and freed heap
# tops go back to the kernel, so each step's activations and gradients faulted in new pages, a number
# that depended on the process's allocation history: the whole difference in step time between a Ray
# Train worker and the in-process loop (benchmarks/RESULTS.md, "Overhead"). Fixed values turn the
# adjustment off and keep the step's memory in the heap (the process stays at its peak, which the next
# step needs again anyway). The mmap threshold is glibc's 64-bit maximum (HEAP_MAX_SIZE / 2); the top
# pad is one thread-arena heap. Variables already set in the environment win.
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024 * 1024),
    "MALLOC_TOP_PAD_": str(64 * 1024 * 1024),
}


def allocator_env() -> dict[str, str]:
    """``ALLOCATOR_ENV`` with the values this process's environment already sets taking precedence."""
    return {name: os.environ.get(name, value) for name, value in ALLOCATOR_ENV.items()}
