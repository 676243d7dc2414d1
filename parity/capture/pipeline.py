"""The writer pipeline: one thread takes records off a queue, batches them
into shards and commits them, so the host never waits for the disk unless
the queue is full.

Whatever goes wrong here is handed to the session's ``on_fail`` / ``on_skip``
and never raised: the thread stops only on ``Stop``, so ``finish()`` returns.
No wait on the thread is unbounded: each gives up once the thread has made
no progress (taken no item, written no byte) for ``stall_s`` seconds.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from parity.store.schema import Record
from parity.store.stats import stats_from_vector
from parity.store.writer import DumpWriter


# ---- what travels on the queue ------------------------------------------------

@dataclass(frozen=True, slots=True)
class Entry:
    """One record as the hook made it. ``payload``: a copy the host no longer
    sees (None for a stats-only record); ``summary``: its stats vector, or
    None when the writer summarises the payload itself."""
    record: Record
    payload: torch.Tensor | None
    summary: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class Group:
    """Records that travel together. On CUDA, ``ready`` fires once their
    copies and summaries are done, and the small payloads lie in ``arena``."""
    entries: tuple[Entry, ...]
    ready: torch.cuda.Event | None = None
    arena: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class Flush:
    """Set ``done`` once everything queued before it is on disk."""
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True, slots=True)
class Stop:
    """Write what is waiting, then end the thread."""


# Brings a group's payloads to the host, in entry order (None stays None).
Land = Callable[[Group], Iterable["torch.Tensor | None"]]


class Pipeline:
    def __init__(self, writer: DumpWriter, *, slots: int, flush_bytes: int, max_delay_s: float,
                 stall_s: float, land: Land, on_fail: Callable[[BaseException, str], None],
                 on_skip: Callable[[str, str, str], None]):
        self.writer = writer
        self.stall_s = stall_s
        self.failed = False    # the disk failed: what arrives is dropped, so the host never blocks
        self.stalled = False   # a wait gave up on the thread: later waits do not start again
        self._flush_bytes = flush_bytes
        self._max_delay_s = max_delay_s
        self._land = land
        self._on_fail = on_fail
        self._on_skip = on_skip
        self._beat = 0         # items taken: the thread's progress, with the bytes it wrote
        # The bound counts records, not queue items: a group takes one slot
        # per record, so PARITY_DUMP_QUEUE keeps its meaning.
        self._slots = threading.Semaphore(slots)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._batch: list[tuple[Record, torch.Tensor | None]] = []
        self._batch_bytes = 0
        self._thread = threading.Thread(target=self._drain, name="parity-writer", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- the host's side ----------------------------------------------------
    def put(self, group: Group) -> bool:
        """Queue ``group``, waiting for one slot per record; False (and
        nothing queued) once the thread has stopped moving."""
        for taken in range(len(group.entries)):
            if not self._wait(lambda s: self._slots.acquire(timeout=s)):
                for _ in range(taken):
                    self._slots.release()
                return False
        self._queue.put(group)
        return True

    def flush(self) -> bool:
        """Wait until everything queued so far is on disk; False when the wait gave up."""
        request = Flush()
        self._queue.put(request)
        return self._wait(request.done.wait)

    def finish(self) -> bool:
        """Write what is queued and end the thread; False when the wait gave up."""
        self._queue.put(Stop())
        return self._wait(lambda s: _ended(self._thread, s))

    def _wait(self, ready: Callable[[float], bool]) -> bool:
        """Call ``ready(timeout)`` until it is true; False once the thread has
        died or has made no progress for ``stall_s`` seconds."""
        if self.stalled:
            return ready(0)
        mark, since = self._progress(), time.monotonic()
        while not ready(0.1):
            if not self._thread.is_alive():
                return ready(0)
            now = self._progress()
            if now != mark:
                mark, since = now, time.monotonic()
            elif time.monotonic() - since > self.stall_s:
                self.stalled = True
                return False
        return True

    def _progress(self) -> tuple[int, int]:
        return self._beat, self.writer.progress

    # ---- the thread ---------------------------------------------------------------
    def _drain(self) -> None:
        # One intra-op thread here (the setting is per thread): the host's own
        # thread pool already fills the cores, and a second pool spinning
        # beside it slows the model far more than the writer gains.
        torch.set_num_threads(1)
        due = None  # when the oldest unwritten record must be on disk
        while True:
            item = self._next(due)
            self._beat += 1
            if isinstance(item, Group):
                self._take_group(item)
                item = None  # let the device copies go now, not when the next item comes
                due = self._due(due)
                continue
            # Time is up (None), a flush or the stop: write what is waiting.
            # _commit never raises, so the stop is always obeyed.
            self._commit()
            due = None
            if isinstance(item, Flush):
                item.done.set()
            elif isinstance(item, Stop):
                return

    def _next(self, due: float | None):
        """The next item, or None once ``due`` has passed."""
        try:
            return self._queue.get(timeout=None if due is None else max(0.0, due - time.monotonic()))
        except queue.Empty:
            return None

    def _due(self, due: float | None) -> float | None:
        # Group commit: one shard and one fsync'd manifest append per
        # max_delay_s, not per record, so a stream of small records costs
        # the host neither fsyncs nor the writer's GIL time.
        if not self._batch:
            return None
        return time.monotonic() + self._max_delay_s if due is None else due

    def _take_group(self, group: Group) -> None:
        try:
            self._take(group)
        except Exception as exc:  # noqa: BLE001 - a device copy failed: nothing more can be written
            self._write_fail(exc, "bringing records to the host")
        finally:
            for _ in group.entries:
                self._slots.release()

    def _take(self, group: Group) -> None:
        """Add one group's records to the batch, as host tensors."""
        if self.failed:
            return
        for entry, payload in zip(group.entries, self._land(group)):
            rec = entry.record
            if entry.summary is not None:
                rec = dataclasses.replace(rec, stats=stats_from_vector(entry.summary))
            if payload is None:
                self._batch.append((rec, None))
                continue
            self.writer.digest_soon(rec, payload)
            self._batch.append((rec, payload))
            self._batch_bytes += payload.numel() * payload.element_size()
            if self._batch_bytes >= self._flush_bytes:
                self._commit()

    def _commit(self) -> None:
        """Write the batch as one shard. Never raises: a failure of the disk
        turns capture off; a failure of one record skips that record only."""
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if not batch or self.failed:
            return
        try:
            self.writer.write_batch(batch)
        except OSError as exc:  # disk full, permissions, ...: nothing more will fit
            self._write_fail(exc, "writing the dump")
        except Exception:  # noqa: BLE001 - one record's summary or metadata: write the others
            self._commit_each(batch)

    def _commit_each(self, batch: list) -> None:
        for rec, t in batch:
            try:
                self.writer.write_batch([(rec, t)])
            except OSError as exc:
                self._write_fail(exc, "writing the dump")
                return
            except Exception as exc:  # noqa: BLE001
                self._on_skip(rec.key, "records that fail to write", f"{type(exc).__name__}: {exc}")

    def _write_fail(self, exc: BaseException, where: str) -> None:
        self.failed = True
        self._batch, self._batch_bytes = [], 0
        self.writer.drop_early()
        self._on_fail(exc, where)


def _ended(thread: threading.Thread, timeout: float) -> bool:
    thread.join(timeout)
    return not thread.is_alive()
