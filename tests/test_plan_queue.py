"""The shared-memory plan queue (distributed/plan_queue.py): every reader gets every message in
order, also when the writer runs a full ring ahead, messages larger than a slot go by the
fallback in their place, the writer gives up on a reader that takes nothing, and the file is
gone once unlinked while the mappings keep working."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest

from fairswitch.distributed.plan_queue import PlanReader, PlanWriter


def _never() -> None:
    pass


def _read_all(handle, reader, count, out):
    r = PlanReader(handle, reader)
    got = []
    for _ in range(count):
        msg = r.get(_never, lambda: ("fallback", None))
        got.append(msg[1].sum() if msg[0] == "array" else msg)
    out.put((reader, got))


def test_readers_get_every_message_in_order_across_processes():
    writer = PlanWriter(num_readers=2, slot_bytes=1 << 12, num_slots=3)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    count = 40
    procs = [ctx.Process(target=_read_all, args=(writer.handle, r, count, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    sent_by_fallback = []
    for i in range(count):
        # every 7th message is larger than a slot: the fallback carries it
        msg = ("array", np.full(4096 if i % 7 == 0 else 8, i, dtype=np.int64))
        writer.put(msg, timeout_s=60, check=_never, fallback=sent_by_fallback.append)
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(10)
    writer.unlink()
    want = [("fallback", None) if i % 7 == 0 else 8 * i for i in range(count)]
    assert results == {0: want, 1: want}
    assert [m[1][0] for m in sent_by_fallback] == list(range(0, count, 7))


def test_writer_waits_for_the_slowest_reader_then_gives_up():
    writer = PlanWriter(num_readers=2, slot_bytes=256, num_slots=2)
    fast, slow = PlanReader(writer.handle, 0), PlanReader(writer.handle, 1)
    writer.unlink()
    assert not os.path.exists(writer.handle.path)  # mapped: still works
    for i in range(2):
        writer.put(i, 5, _never, _never)
    assert [fast.get(_never, _never) for _ in range(2)] == [0, 1]
    with pytest.raises(TimeoutError, match="took no plan"):
        writer.put(2, 0.2, _never, _never)  # the slow reader still holds slot 1
    assert slow.get(_never, _never) == 0
    writer.put(2, 5, _never, _never)  # its slot is free now
    assert [slow.get(_never, _never), fast.get(_never, _never),
            slow.get(_never, _never)] == [1, 2, 2]


def test_a_check_that_raises_ends_the_wait():
    writer = PlanWriter(num_readers=1, slot_bytes=256, num_slots=1)
    reader = PlanReader(writer.handle, 0)
    writer.unlink()

    def gone():
        raise RuntimeError("peer gone")

    with pytest.raises(RuntimeError, match="peer gone"):
        reader.get(gone, _never)  # nothing was sent
    writer.put("a", 5, _never, _never)
    with pytest.raises(RuntimeError, match="peer gone"):
        writer.put("b", 60, gone, _never)  # the reader never took "a"


def test_no_room_for_the_ring_is_an_error_and_leaves_no_file(monkeypatch, tmp_path):
    monkeypatch.setattr("fairswitch.distributed.plan_queue.os.path.isdir", lambda p: False)
    monkeypatch.setattr("fairswitch.distributed.plan_queue.tempfile.gettempdir",
                        lambda: str(tmp_path))

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("fairswitch.distributed.plan_queue.os.posix_fallocate", full,
                        raising=False)
    with pytest.raises(OSError, match="No space"):
        PlanWriter(num_readers=1)
    assert list(tmp_path.iterdir()) == []
