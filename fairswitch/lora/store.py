"""Adapters read from their folders, by ``lora_int_id``: the last ``capacity`` used stay in host
memory (vLLM's max_cpu_loras). The engine's (the driver's): the other tensor-parallel ranks get
a slot's weights in the step plan. Thread-safe: the server reads an adapter it is asked to load
off the engine's thread, which may be reading another."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from fairswitch.lora.adapter import LoRAAdapter, read_adapter
from fairswitch.lora.request import LoRARequest
from fairswitch.model.checkpoint_config import CheckpointConfig


class AdapterStore:
    def __init__(self, config: CheckpointConfig, max_rank: int, capacity: int,
                 dtype: torch.dtype) -> None:
        self.config = config
        self.max_rank = max_rank
        self.capacity = capacity
        self.dtype = dtype
        self._read: OrderedDict[int, LoRAAdapter] = OrderedDict()  # least recently used first
        self._known: dict[int, tuple[str, str]] = {}  # id -> (name, path) ever given
        self._lock = threading.Lock()  # (held for the dicts only, never while reading)

    def get(self, request: LoRARequest) -> LoRAAdapter:
        """``request``'s adapter, read now unless in memory. ValueError if its id was given
        before with another name or path, or the adapter cannot be served (adapter.py)."""
        if not isinstance(request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got "
                            f"{type(request).__name__}")
        rid, key = request.lora_int_id, (request.lora_name, request.lora_path)
        with self._lock:
            self._check_id(rid, key)
            if (adapter := self._read.get(rid)) is not None:
                self._read.move_to_end(rid)
                return adapter
        adapter = read_adapter(request.lora_name, rid, request.lora_path, self.config,
                               self.max_rank, self.dtype)
        with self._lock:
            self._check_id(rid, key)  # (another thread may have given the id meanwhile)
            adapter = self._read.setdefault(rid, adapter)
            self._read.move_to_end(rid)
            self._known[rid] = key
            while len(self._read) > self.capacity:
                self._read.popitem(last=False)
        return adapter

    def _check_id(self, rid: int, key: tuple[str, str]) -> None:
        known = self._known.get(rid)
        if known is not None and known != key:
            raise ValueError(f"lora_int_id {rid} is adapter {known[0]!r} from {known[1]!r}, "
                             f"not {key[0]!r} from {key[1]!r}: give another id")

    def forget(self, lora_int_id: int) -> None:
        """Drop an adapter (unloaded): its id may then name another."""
        with self._lock:
            self._read.pop(lora_int_id, None)
            self._known.pop(lora_int_id, None)
