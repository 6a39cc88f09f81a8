"""LoRA adapters served beside the base model (vLLM's multi-LoRA): read from PEFT folders
(adapter.py), held in slots on the device that every step's tokens pick from (weights.py), a
slot given to a request while it is seated in the batch (slots.py)."""
