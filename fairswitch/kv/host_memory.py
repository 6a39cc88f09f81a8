"""Page-locked host memory for the CPU swap space, allocated at its exact size and quickly.

``torch.empty(..., pin_memory=True)`` goes through torch's caching host allocator, which rounds
the request up to a power of two (a 60 GiB swap space pins 64 GiB) and pins with one
``cudaHostAlloc`` that faults the pages in on a single thread: 24 GiB took 14.9 s on the H200
host. Here the pages are faulted in by ``zero_`` (torch's CPU threads) and then registered with
``cudaHostRegister``: 5.4 s for 24 GiB there. The registration is undone when the tensor is
freed.

Benchmarks that build engine after engine in one process (``--compare``, sweeps, policies) wrap
them in ``keep_pinned()``: a swap space's memory then outlives its engine and serves the next one,
so 60 GiB are pinned once, not once per engine (about 13 s each on the H200 host).
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Buffer:
    """A registered host buffer (bytes) kept for reuse inside ``keep_pinned``."""
    base: torch.Tensor
    in_use: bool = False


_kept: list[_Buffer] = []
_keep_depth = 0


@contextlib.contextmanager
def keep_pinned() -> Iterator[None]:
    """Within this scope (scopes nest), ``pinned_empty`` hands out memory that was registered
    before and is no longer used when one is large enough, not zeroed again (a swap space is
    never read before it is written), and keeps what it hands out registered once its tensor is
    gone. On leaving the outermost scope, kept memory nobody uses is unregistered and freed;
    memory still in use is unregistered when its tensor dies, as outside the scope. A tensor
    from the scope must not be used through a view after the tensor itself is gone: its memory
    may serve the next engine by then."""
    global _keep_depth
    _keep_depth += 1
    try:
        yield
    finally:
        _keep_depth -= 1
        if _keep_depth == 0:
            _drop_unused()


def _drop_unused() -> None:
    for buf in [b for b in _kept if not b.in_use]:
        _kept.remove(buf)
        _unregister(torch.cuda.cudart(), buf.base.data_ptr(), buf.base)


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A page-locked host tensor of exactly ``shape`` (zeroed: its pages are resident; inside
    ``keep_pinned`` reused memory keeps its old bytes).

    The memory stays registered while the returned tensor lives: its finalizer unregisters it
    and only then lets go of the owning tensor (views outliving it stay valid, unpinned)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    if _keep_depth:
        return _from_kept(shape, dtype, nbytes)
    base = _register(nbytes)
    if base is None:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    out = base.view(dtype).view(shape)
    weakref.finalize(out, _unregister, torch.cuda.cudart(), base.data_ptr(), base)
    return out


def _from_kept(shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> torch.Tensor:
    free = [b for b in _kept if not b.in_use and b.base.numel() >= nbytes]
    if free:
        buf = min(free, key=lambda b: b.base.numel())
    else:
        _drop_unused()  # too small for this one: give the host its memory back first
        base = _register(nbytes)
        if base is None:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        buf = _Buffer(base)
        _kept.append(buf)
    buf.in_use = True
    out = buf.base[:nbytes].view(dtype).view(shape)
    weakref.finalize(out, _release, buf)
    return out


def _release(buf: _Buffer) -> None:
    buf.in_use = False
    if not _keep_depth:  # the scope ended while the tensor lived
        _drop_unused()


def _register(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` zeroed host bytes registered with CUDA; None if the registration is refused."""
    base = torch.zeros(nbytes, dtype=torch.uint8)
    err = torch.cuda.cudart().cudaHostRegister(base.data_ptr(), nbytes, 0)
    if int(err) != 0:
        # Registration refused (e.g. a locked-memory limit): the allocator's pinned memory.
        logger.warning("cudaHostRegister of %.1f GiB failed (%s): using torch's pinned "
                       "allocator", nbytes / (1 << 30), err)
        return None
    return base


def _unregister(cudart, ptr: int, base: torch.Tensor) -> None:
    cudart.cudaHostUnregister(ptr)  # then ``base``, the last owner, is dropped
