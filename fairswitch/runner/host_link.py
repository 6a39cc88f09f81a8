"""How a step's small data crosses between host and device: through pinned host buffers, moved by
a kernel (kernels/host_copy.py) rather than by ``cudaMemcpyAsync``.

Swap-ins keep the host->device copy engine busy for milliseconds at a time (and swap-outs the
device->host one); a step's inputs or sampled tokens sent by DMA would queue behind them, and
the step with them. Kernel copies read and write the pinned buffers over PCIe directly.

    host (pinned)   [ fields of one step ... ]  --copy_words-->  device  [ same layout ]
    device          [ sampled token ids ]       --copy_words-->  host (pinned) -> list[int]
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def _copy_words() -> Callable[[torch.Tensor, torch.Tensor, int], None]:
    # Triton is imported where a buffer is built (on CUDA), not by importing this module: the
    # CPU engine runs without it.
    from fairswitch.kernels.host_copy import copy_words

    return copy_words


class StagingBuffer:
    """A step's inputs in one byte buffer, pinned on the host and mirrored on the device, so
    they go over in one copy (separate small pageable copies and pad fills cost ~10 us each of
    GPU idle time per step). ``take`` hands out consecutive typed fields (device view, host
    numpy view) from ``offset``; a step waits until the previous copy has read the host buffer
    (``wait_sent``), writes the host views, then ``send``s the bytes it uses."""

    _NP = {torch.int64: np.int64, torch.int32: np.int32}

    def __init__(self, nbytes: int, device: torch.device) -> None:
        nbytes = -(-nbytes // 4) * 4  # whole int32 words
        self._host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)
        self._dev = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self._host_words = self._host.view(torch.int32)
        self._dev_words = self._dev.view(torch.int32)
        self._host_np = self._host.numpy()
        self._sent = torch.cuda.Event()
        self._copy = _copy_words()
        self.offset = 0

    def take(self, dtype: torch.dtype, *shape: int) -> tuple[torch.Tensor, np.ndarray]:
        size = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        lo, hi = self.offset, self.offset + size
        if hi > len(self._host_np):
            raise ValueError(f"fields up to byte {hi} overflow the {len(self._host_np)}-byte "
                             "staging buffer")
        self.offset = hi
        return (self._dev[lo:hi].view(dtype).view(shape),
                self._host_np[lo:hi].view(self._NP[dtype]).reshape(shape))

    def wait_sent(self) -> None:
        self._sent.synchronize()

    def send(self, nbytes: int | None = None) -> None:
        """Copy the first ``nbytes`` (all by default) to the device, in stream order."""
        end = len(self._host_np) if nbytes is None else nbytes
        self._copy(self._host_words, self._dev_words, -(-end // 4))
        self._sent.record()


class SampleRowsBuffer:
    """The hidden-state rows a step samples from (steps with prompt tokens), sent to the device
    through a staging buffer."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity = capacity
        self._staging = StagingBuffer(8 * capacity, device)
        self._dev, self._host = self._staging.take(torch.int64, capacity)

    def send(self, rows: list[int]) -> torch.Tensor:
        n = len(rows)
        if n > self.capacity:
            raise ValueError(f"{n} sampled rows exceed the buffer's {self.capacity}")
        self._staging.wait_sent()
        self._host[:n] = rows
        self._staging.send(8 * n)
        return self._dev[:n]


class TokenReturn:
    """Sampled token ids back to the host: a kernel writes them into pinned memory, the host waits
    for it and reads them (``tensor.tolist()`` would copy by DMA, behind any swap-out).

    ``depth`` slots are used in turn, so that many sends may await their ``receive`` at once (a
    pipelined engine launches a step before it receives the one before: depth 2)."""

    def __init__(self, capacity: int, depth: int = 2) -> None:
        self.capacity = capacity
        # Rows of an even number of int64s: every slot starts 16-byte aligned, as Triton
        # specializes the copy kernel on it (an odd capacity compiled a variant while serving).
        row = -(-capacity // 2) * 2
        self._host = torch.zeros(depth, row, dtype=torch.int64, pin_memory=True)
        self._host_words = self._host.view(torch.int32)
        self._host_np = self._host.numpy()
        self._done = [torch.cuda.Event() for _ in range(depth)]
        self._copy = _copy_words()
        self._next = 0

    def send(self, tokens: torch.Tensor) -> tuple[int, int]:
        """Queue the copy of ``tokens`` (1-D, on the device, this stream) to the host; return the
        handle ``receive`` takes. Queued with the step, so work the stream is told to wait for
        later (a swap-in's event) does not hold the tokens back."""
        n = len(tokens)
        if n > self.capacity:
            raise ValueError(f"{n} sampled tokens exceed the buffer's {self.capacity}")
        slot = self._next
        self._next = (slot + 1) % len(self._done)
        words = tokens.to(torch.int64).contiguous().view(torch.int32)
        self._copy(words, self._host_words[slot], 2 * n)
        self._done[slot].record()
        return slot, n

    def receive(self, handle: tuple[int, int]) -> list[int]:
        """Wait for the copy ``send`` queued and return its tokens as ints."""
        slot, n = handle
        self._done[slot].synchronize()
        return self._host_np[slot, :n].tolist()

    def fetch(self, tokens: torch.Tensor) -> list[int]:
        """``send`` then ``receive``: the tokens as ints, once the step has produced them."""
        return self.receive(self.send(tokens))
