"""Page-locked host memory for the CPU swap space, allocated at its exact size and quickly.

``torch.empty(..., pin_memory=True)`` goes through torch's caching host allocator, which rounds
the request up to a power of two (a 60 GiB swap space pins 64 GiB) and pins with one
``cudaHostAlloc`` that faults the pages in on a single thread: 24 GiB took 14.9 s on the H200
host. Here the pages are faulted in by ``zero_`` (torch's CPU threads) and then registered with
``cudaHostRegister``: 5.4 s for 24 GiB there. The registration is undone when the tensor is
freed.
"""

from __future__ import annotations

import logging
import weakref

import torch

logger = logging.getLogger(__name__)


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A page-locked host tensor of exactly ``shape`` (zeroed: its pages are resident).

    The memory stays registered while the returned tensor lives: its finalizer unregisters it
    and only then lets go of the owning tensor (views outliving it stay valid, unpinned)."""
    base = torch.zeros(shape, dtype=dtype)
    nbytes = base.numel() * base.element_size()
    if nbytes == 0:
        return base
    cudart = torch.cuda.cudart()
    ptr = base.data_ptr()
    err = cudart.cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        # Registration refused (e.g. a locked-memory limit): the allocator's pinned memory.
        logger.warning("cudaHostRegister of %.1f GiB failed (%s): using torch's pinned "
                       "allocator", nbytes / (1 << 30), err)
        del base
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    out = base.view(shape)
    weakref.finalize(out, _unregister, cudart, ptr, base)
    return out


def _unregister(cudart, ptr: int, base: torch.Tensor) -> None:
    cudart.cudaHostUnregister(ptr)  # then ``base``, the last owner, is dropped
