"""LoRA adapters served under model names of their own, as vLLM serves them: ``--lora-modules
name=path`` at start-up, and, when allowed (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING), loaded and
unloaded while serving by ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``. A
request whose ``model`` is an adapter's name runs with it; ``/v1/models`` lists the adapters
after the base model's names, each with the base as its parent.

Adapters are read once, off the engine's thread (an adapter's folder can take a while), and held
in memory while served; each name gets a fresh ``lora_int_id``: KV cached under an unloaded
adapter is never served to one loaded later under the same name.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

from aiohttp import web

from fairswitch.engine.async_engine import AsyncEngine
from fairswitch.lora.adapter import LoRAAdapter
from fairswitch.lora.request import LoRARequest
from fairswitch.server.errors import APIError, bad_request


class ServedAdapters:
    def __init__(self, engine: AsyncEngine, base_names: list[str],
                 modules: dict[str, str]) -> None:
        """``modules``: name -> adapter folder, read now (ValueError naming a bad one)."""
        self.engine = engine
        self.base_names = base_names
        self.by_name: dict[str, LoRAAdapter] = {}
        self._ids = itertools.count(1)
        if modules and engine.engine.lora_store is None:
            raise ValueError("LoRA modules need LoRA enabled: add --enable-lora")
        for name, path in modules.items():
            self._check_name(name)
            request = LoRARequest(name, next(self._ids), path)
            self.by_name[name] = engine.engine.check_lora(request)  # (no request runs yet)

    def _check_name(self, name: str) -> None:
        if name in self.base_names:
            raise ValueError(f"LoRA adapter name {name!r} is the base model's")

    def names(self) -> list[str]:
        return list(self.by_name)

    def lookup(self, model: str | None) -> LoRAAdapter | None:
        """The adapter a request's ``model`` names (None: the base model); 404 for a name
        served no more (unloaded since the request's model was checked)."""
        if model is None or model in self.base_names:
            return None
        adapter = self.by_name.get(model)
        if adapter is None:
            raise APIError(404, f"The model `{model}` does not exist (any more).", param="model",
                           code="model_not_found")
        return adapter

    def cards(self, created: int, parent: str) -> list[dict[str, Any]]:
        return [{"id": name, "object": "model", "created": created, "owned_by": "fairswitch",
                 "root": adapter.path, "parent": parent, "max_model_len": None,
                 "permission": []} for name, adapter in self.by_name.items()]

    async def load(self, request: web.Request) -> web.Response:
        """vLLM's ``POST /v1/load_lora_adapter`` {"lora_name", "lora_path"}."""
        body = _json_object(await request.read())
        name, path = body.get("lora_name"), body.get("lora_path")
        if not (isinstance(name, str) and name and isinstance(path, str) and path):
            raise bad_request("Both 'lora_name' and 'lora_path' must be provided (strings).")
        if name in self.by_name:
            raise bad_request(f"The lora adapter '{name}' has already been loaded.",
                              "lora_name")
        try:
            self._check_name(name)
            lora = LoRARequest(name, next(self._ids), path)
            adapter = await asyncio.to_thread(self.engine.engine.check_lora, lora)
        except ValueError as e:
            raise bad_request(str(e), "lora_path") from e
        if name in self.by_name:  # (loaded meanwhile by a request of its own)
            self.engine.engine.lora_store.forget(lora.lora_int_id)  # type: ignore
            raise bad_request(f"The lora adapter '{name}' has already been loaded.",
                              "lora_name")
        self.by_name[name] = adapter
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        """vLLM's ``POST /v1/unload_lora_adapter`` {"lora_name"}: requests running with it
        finish with it; new ones naming it get 404."""
        body = _json_object(await request.read())
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise bad_request("'lora_name' must be provided (a string).", "lora_name")
        adapter = self.by_name.pop(name, None)
        if adapter is None:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.",
                           param="lora_name", code="model_not_found")
        self.engine.engine.lora_store.forget(adapter.int_id)  # type: ignore[union-attr]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body
