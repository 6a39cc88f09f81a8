"""AsyncEngine: the engine stepping in its own thread, one async output stream per request.

The engine is single-threaded. Adds and aborts travel to its thread as commands executed between
steps (so validation errors come back to the caller as exceptions); outputs travel back to each
request's asyncio.Queue on the caller's event loop: one step's outputs in one callback per loop,
handed over once the next step is launched on the GPU, so that the loop's work (waking every
consumer) runs while the engine thread waits for the GPU rather than contending for the GIL with
its scheduling (benchmarks/async_overhead.py measures it). While it runs, the objects alive at
its start are frozen out of the garbage collector's full collections (``freeze_gc``,
gc_control.py).
Leaving ``generate()`` early (the consumer breaks, or its task is cancelled, e.g. the HTTP client
went away) aborts the request, which frees its KV blocks before the next step.

Its thread holds it: an AsyncEngine is never collected until ``shutdown()`` (or the end of a
``with AsyncEngine...:`` block) stops the thread and frees the model and the KV cache.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fairswitch.config import EngineConfig
from fairswitch.engine.engine import Engine
from fairswitch.engine.gc_control import GC_CLOCK, frozen_heap
from fairswitch.outputs import RequestOutput
from fairswitch.pooling_params import PoolingParams
from fairswitch.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread failed; no request can be served any more."""


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


def _put_all(puts: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in puts:
        q.put_nowait(item)


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._pending: list[RequestOutput] = []  # the last step's outputs, not yet delivered
        self._stopping = False
        self._error: BaseException | None = None
        self._closed = False  # the engine thread takes no more commands
        # The last step's outputs go out while the GPU computes the next (Engine.step).
        engine.events.on_gpu_busy.append(self._flush)
        GC_CLOCK.install()
        self._frozen = contextlib.ExitStack()
        if engine.config.model.freeze_gc:
            self._frozen.enter_context(frozen_heap())
        self._thread = threading.Thread(target=self._loop, name="fairswitch-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(Engine(config))

    def __enter__(self) -> AsyncEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- caller side (event loop) ---------------------------------------------------------

    async def _call(self, fn: Callable[[], Any]) -> Any:
        if self._error is not None or self._stopping:
            raise self._dead_error()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        self._wake.set()
        if self._closed:  # the engine thread stopped after the check above: it never runs fn
            self._fail_pending_commands()
        return await asyncio.wrap_future(fut)

    def _dead_error(self) -> EngineDeadError:
        if self._error is None:
            return EngineDeadError("engine is shut down")
        err = EngineDeadError(f"engine failed: {self._error!r}")
        err.__cause__ = self._error
        return err

    async def generate(self, prompt: str | list[int] | None,
                       params: SamplingParams | None = None, *, request_id: str | None = None,
                       prompt_token_ids: list[int] | None = None, priority: int = 0,
                       client_id: str | None = None,
                       queue_places: int = 1, held_by: str | None = None,
                       pooling: PoolingParams | None = None, lora_request: Any = None,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they come; the last one has ``finished=True``.
        One sequence (``params.n == 1``): for n, generate each of ``params.copies()``.
        ``queue_places``, ``held_by``: Scheduler.add_request (n choices admitted together);
        ``pooling``: an embedding request (Engine.add_request: its last output holds it);
        ``lora_request``: its LoRA adapter (a LoRARequest, Engine.add_request); ``cache_salt``:
        Engine.add_request's. A
        prompt of the wrong type raises TypeError (as in ``LLM.generate``), other bad input
        ValueError;
        ``shutdown()`` ends the stream with ``finish_reason="abort"``, a failed step
        with EngineDeadError, which every call after either raises."""
        # (as the engine keys it: a str; 0 is an id like any other)
        request_id = uuid.uuid4().hex if request_id is None else str(request_id)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        # (one step: callers on other threads' loops may claim the same id at once)
        if self._streams.setdefault(request_id, stream) is not stream:
            raise ValueError(f"request id {request_id!r} is already in use")
        finished = False
        try:
            try:
                grammar = None
                # (a params of the wrong type is add_request's TypeError)
                if getattr(params, "structured_outputs", None) is not None:
                    # Compiled here, off the engine thread: no step waits for it.
                    grammar = await asyncio.to_thread(self.engine.compile_grammar,
                                                      params.structured_outputs)
                await self._call(lambda: self.engine.add_request(
                    prompt, params, request_id=request_id, prompt_token_ids=prompt_token_ids,
                    priority=priority, client_id=client_id, queue_places=queue_places,
                    held_by=held_by, grammar=grammar, pooling=pooling,
                    lora_request=lora_request, cache_salt=cache_salt))
            except Exception:
                # Not added: nothing to abort, and a request the engine holds under this id
                # is another caller's. (Cancelled, the add may have run: it is aborted below.)
                finished = True
                raise
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"engine failed: {item!r}") from item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if finished:
                self._forget(request_id, stream)
            else:  # the id stays taken until the abort has run: a caller reusing it meanwhile
                # got its own request aborted by this one's abort, and waited for good
                self._submit(lambda: (self.engine.abort_request(request_id),
                                      self._forget(request_id, stream)))

    def _forget(self, request_id: str, stream: _Stream) -> None:
        if self._streams.get(request_id) is stream:
            del self._streams[request_id]

    async def abort(self, request_id: str) -> None:
        """Abort a request and wait until its blocks are free."""
        await self._call(lambda: self._abort_and_notify(str(request_id)))

    async def reserve_places(self, hold_id: str, n: int) -> None:
        """Scheduler.reserve_places, on the engine thread (QueueFullError: no room now)."""
        await self._call(lambda: self.engine.reserve_places(str(hold_id), n))

    def release_places(self, request_id: str) -> None:
        """Scheduler.release_places, as the engine's next command (not waited for)."""
        self._submit(lambda: self.engine.release_places(str(request_id)))

    async def sync(self) -> None:
        """Wait until every command submitted before this call has run (e.g. aborts)."""
        await self._call(lambda: None)

    async def run_in_engine(self, fn: Callable[[Engine], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps (for stats and tests)."""
        return await self._call(lambda: fn(self.engine))

    def _submit(self, fn: Callable[[], Any]) -> None:
        self._commands.put((fn, None))
        self._wake.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort everything in flight and stop the engine thread, waiting ``timeout`` seconds
        for its step. A step that takes longer with tensor parallelism is stuck in a collective
        (a rank hangs): the workers are killed, which fails it, and the engine has failed."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        workers = self.engine.workers
        if self._thread.is_alive() and workers is not None:
            logger.error("shutdown: the engine's step did not end within %.3g s: killing the "
                         "tensor-parallel workers", timeout)
            workers.kill()
            self._thread.join(timeout)
        self._frozen.close()  # the engine's memory can be collected again
        if not self._thread.is_alive():  # (a step still running owns the other ranks)
            self.engine.shutdown()

    @property
    def failed(self) -> bool:
        """Did a step raise (the engine thread stopped with an error)?"""
        return self._error is not None

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._error is None

    # ---- engine thread --------------------------------------------------------------------

    def _abort_and_notify(self, request_id: str) -> None:
        out = self.engine.abort_request(request_id)
        if out is not None:
            self._flush()  # the abort's output must not overtake the request's last tokens
            self._deliver([out])

    def _deliver(self, items: list[RequestOutput | BaseException],
                 request_ids: list[str] | None = None) -> None:
        """Hand items to their streams' queues, in order: one callback per event loop."""
        if request_ids is None:
            request_ids = [item.request_id for item in items]  # type: ignore[union-attr]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for rid, item in zip(request_ids, items):
            stream = self._streams.get(rid)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, puts in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, puts)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                self._drop_streams_of(loop)

    def _drop_streams_of(self, loop: asyncio.AbstractEventLoop) -> None:
        """A loop closed with streams still open (it did not finalize its async generators, as
        asyncio.run does): their requests would run to the end for nobody, holding KV blocks.
        They are aborted between steps (this may run inside one)."""
        for rid, stream in list(self._streams.items()):
            if stream.loop is loop and self._streams.pop(rid, None) is not None:
                self._submit(lambda rid=rid: self.engine.abort_request(rid))

    def _flush(self) -> None:
        """Deliver the outputs held back from the last step."""
        if self._pending:
            pending, self._pending = self._pending, []
            self._deliver(pending)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            # The caller gave up on this command (its task was cancelled): skip it. Once marked
            # running it can no longer be cancelled, so setting its result below is safe.
            if fut is not None and not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                if fut is not None:
                    fut.set_exception(e)
                else:
                    logger.exception("engine command failed")
            else:
                if fut is not None:
                    fut.set_result(result)

    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self._run_commands()
                if not engine.has_unfinished_requests():
                    self._flush()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                outputs = engine.step()  # the last step's go out in it (gpu_busy)
                self._flush()  # this step had nothing to wait for: they go out now
                self._pending = outputs
                if engine.step_in_flight:  # the GPU already runs the next one: no need to wait
                    self._flush()
        except BaseException as e:  # noqa: BLE001 - every waiting stream must hear of it
            logger.exception("engine step failed")
            self._error = e
            self._flush()
            rids = list(self._streams)
            self._deliver([e] * len(rids), rids)
        finally:
            self._closed = True  # (before the commands are failed: _call checks it after)
            try:
                self._stop_streams()
            finally:  # whatever failed above, no caller may wait on a command for good
                self._fail_pending_commands()

    def _stop_streams(self) -> None:
        """As the engine thread stops: the last outputs go out, and every request left is
        aborted, its stream told (an abort that raises tells its stream the error)."""
        engine = self.engine
        try:
            self._flush()
        finally:
            engine.events.on_gpu_busy.remove(self._flush)  # (no cycle keeps this object alive)
        items: list[RequestOutput | BaseException] = []
        rids: list[str] = []
        for rid in list(engine.requests):
            try:
                out = engine.abort_request(rid)
            except Exception as e:  # noqa: BLE001 - e.g. its detokenizer: the others go on
                logger.exception("aborting request %r as the engine stopped", rid)
                items.append(e)
                rids.append(rid)
                continue
            if out is not None and self._error is None:
                items.append(out)
                rids.append(rid)
        if items:  # (one callback per event loop, as a step's outputs)
            self._deliver(items, rids)

    def _fail_pending_commands(self) -> None:
        """Fail the commands left queued (run by the engine thread as it stops, and by a
        caller whose command came after that)."""
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(self._dead_error())
