"""Pinned swap-space memory (kv/host_memory.py) against a fake CUDA runtime: exact-size
registration, unregistration when the tensor dies, and reuse across engines inside keep_pinned().
The real page-locking is checked on the GPU (test_gpu.py)."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch

from fairswitch.kv import host_memory
from fairswitch.kv.host_memory import keep_pinned, pinned_empty


class FakeCudart:
    def __init__(self, refuse: bool = False) -> None:
        self.registered: dict[int, int] = {}  # pointer -> bytes
        self.num_registrations = 0
        self.refuse = refuse

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:
        if self.refuse:
            return 1
        assert ptr not in self.registered
        self.registered[ptr] = nbytes
        self.num_registrations += 1
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:
        del self.registered[ptr]
        return 0


@pytest.fixture
def cudart(monkeypatch):
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    yield fake
    gc.collect()
    assert not host_memory._kept and host_memory._keep_depth == 0


def test_exact_size_registered_and_released(cudart):
    host = pinned_empty((3, 5, 7), torch.float16)
    assert host.shape == (3, 5, 7) and host.dtype == torch.float16 and not host.any()
    assert cudart.registered == {host.data_ptr(): 3 * 5 * 7 * 2}
    del host
    gc.collect()
    assert cudart.registered == {}
    assert pinned_empty((0, 4), torch.float32).shape == (0, 4) and cudart.num_registrations == 1


def test_keep_pinned_reuses_memory_across_engines(cudart):
    with keep_pinned():
        first = pinned_empty((4, 8), torch.float32)
        ptr = first.data_ptr()
        first.fill_(7.0)
        del first
        gc.collect()
        assert cudart.registered == {ptr: 128}  # kept for the next engine
        with keep_pinned():  # scopes nest
            second = pinned_empty((2, 8), torch.float16)  # smaller: the same memory serves
        assert second.data_ptr() == ptr and cudart.num_registrations == 1
        third = pinned_empty((4, 8), torch.float32)  # the first is in use: new memory
        assert third.data_ptr() != ptr and cudart.num_registrations == 2
        del second, third
        gc.collect()
        bigger = pinned_empty((64, 8), torch.float32)  # nothing kept fits: the rest is let go
        assert cudart.registered == {bigger.data_ptr(): 64 * 8 * 4}
    # Still in use when the scope ends: unregistered when it dies, as outside the scope.
    assert cudart.registered == {bigger.data_ptr(): 64 * 8 * 4}
    del bigger
    gc.collect()
    assert cudart.registered == {}


def test_unused_memory_is_freed_when_the_scope_ends(cudart):
    with keep_pinned():
        host = pinned_empty((16,), torch.float32)
        del host
        gc.collect()
        assert len(cudart.registered) == 1
    assert cudart.registered == {}


def test_refused_registration_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart(refuse=True))
    calls = []

    def fake_empty(shape, dtype, pin_memory=False):
        calls.append(pin_memory)
        return torch.zeros(shape, dtype=dtype)
    monkeypatch.setattr(host_memory.torch, "empty", fake_empty)
    for scope in (contextlib.nullcontext(), keep_pinned()):
        with scope:
            assert pinned_empty((2, 3), torch.float32).shape == (2, 3)
    assert calls == [True, True] and not host_memory._kept

