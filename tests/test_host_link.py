"""Kernel copies between pinned host memory and the device (kernels/host_copy.py) and the step
buffers built on them (runner/host_link.py).

Without CUDA the kernel runs in Triton's interpreter between CPU tensors; ``-m gpu`` runs it
between pinned host memory and the device, both ways, also while a large host->device DMA is in
flight on another stream (what the kernel copies exist to get past).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fairswitch.kernels import host_copy
from fairswitch.kernels import reference as ref


@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 2500])
def test_copy_words_matches_the_reference(n):
    src = torch.randint(-2**31, 2**31 - 1, (2600,), dtype=torch.int32)
    dst = torch.full((2600,), 7, dtype=torch.int32)
    want = dst.clone()
    host_copy.copy_words(src, dst, n)
    ref.copy_words(src, want, n)
    assert torch.equal(dst, want)  # the words past n are untouched


def test_copy_words_rejects_bad_arguments():
    words = torch.zeros(8, dtype=torch.int32)
    with pytest.raises(ValueError, match="cannot copy 9 words"):
        host_copy.copy_words(words, torch.zeros(16, dtype=torch.int32), 9)
    with pytest.raises(ValueError, match="cannot copy -1 words"):
        host_copy.copy_words(words, words.clone(), -1)
    with pytest.raises(AssertionError, match="int32"):
        host_copy.copy_words(words.view(torch.uint8), torch.zeros(32, dtype=torch.uint8), 4)


gpu = pytest.mark.gpu


@gpu
def test_copy_words_between_pinned_host_and_device():
    n = 5000
    host = torch.arange(n, dtype=torch.int32).pin_memory()
    dev = torch.zeros(n, dtype=torch.int32, device="cuda")
    host_copy.copy_words(host, dev, n - 3)
    assert torch.equal(dev[:n - 3].cpu(), host[:n - 3]) and int(dev[-1]) == 0
    back = torch.zeros(n, dtype=torch.int32).pin_memory()
    host_copy.copy_words(dev, back, n)
    torch.cuda.synchronize()
    assert torch.equal(back[:n - 3], host[:n - 3])
    with pytest.raises(ValueError, match="pinned"):
        host_copy.copy_words(torch.zeros(4, dtype=torch.int32), dev, 4)


@gpu
def test_step_buffers_move_data_while_a_swap_in_copies():
    from fairswitch.runner.host_link import SampleRowsBuffer, StagingBuffer, TokenReturn

    dev = torch.device("cuda")
    # A 256 MiB host->device DMA on another stream, as a swap-in is, in flight meanwhile.
    big_host = torch.ones(64 << 20, dtype=torch.int32).pin_memory()
    big_dev = torch.empty_like(big_host, device=dev)
    side = torch.cuda.Stream()
    staging = StagingBuffer(8 * 100 + 4 * 37, dev)
    ids, h_ids = staging.take(torch.int64, 100)
    lens, h_lens = staging.take(torch.int32, 37)
    rows = SampleRowsBuffer(16, dev)
    tokens = TokenReturn(16)
    for step in range(3):
        with torch.cuda.stream(side):
            big_dev.copy_(big_host, non_blocking=True)
        staging.wait_sent()
        h_ids[:] = np.arange(100) * (step + 2)
        h_lens[:] = step
        staging.send()
        picked = rows.send([3, 1, 4, 1, 5])
        assert tokens.fetch(ids[picked] + lens[0]) == [
            int(i) * (step + 2) + step for i in (3, 1, 4, 1, 5)]
    side.synchronize()
    assert int(big_dev[-1]) == 1
    with pytest.raises(ValueError, match="exceed"):
        rows.send(list(range(17)))
    with pytest.raises(ValueError, match="exceed"):
        tokens.fetch(torch.zeros(17, dtype=torch.int64, device=dev))
