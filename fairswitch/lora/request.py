"""Which LoRA adapter a request runs with (vLLM's ``LoRARequest``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """``lora_name``: what it is called (the server's model name for it); ``lora_int_id``: a
    positive int naming it uniquely, as in vLLM (one id, one adapter: an id given again with
    another path is refused); ``lora_path``: a PEFT adapter folder (adapter_config.json and
    adapter_model.safetensors)."""
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty str, got {self.lora_name!r:.60}")
        if (isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int)
                or self.lora_int_id < 1):
            raise ValueError(f"lora_int_id must be an int >= 1, got {self.lora_int_id!r:.40}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path must name an adapter folder, got {self.lora_path!r:.60}")
