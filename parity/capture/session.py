"""A capture session: what to record, the current context, the writer thread.

The host program must never see an exception from here. Every failure is
caught, reported once on stderr, and turns capture off; the model keeps
running and returns the same outputs. A tensor capture cannot store (complex,
sparse, on the meta device, ...) is skipped with one message per kind, and
capture goes on for the others. No wait on the writer is unbounded: close(),
flush() and a full queue give up once the writer has made no progress for
_STALL_S seconds.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import re
import sys
import threading
import time

import torch

from parity.capture.taps import state as _tap_state
from parity.config import CaptureConfig
from parity.store.schema import Record, dtype_name, st_code
from parity.store.stats import stats_from_vector, stats_vector
from parity.store.writer import DumpWriter

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")
_FLUSH_BYTES = 64 << 20
# CUDA records wait in the hook's thread until this many (or this many bytes
# of copies) are held, or the context changes, then travel as one group.
_GROUP_RECORDS = 64
_GROUP_BYTES = 256 << 20
# Small CUDA records are copied side by side into one buffer of this size.
_ARENA_BYTES = 4 << 20
_STOP = object()
_DUE = object()  # the oldest unwritten record's time is up
# A record reaches the disk at most this long after the writer took it
# (sooner when 64 MB are waiting, or on flush() / close()).
_MAX_DELAY_S = 0.25
# How long a wait on the writer (close, flush, a full queue) lasts without the
# writer making any progress (taking an item, writing bytes) before it gives up.
_STALL_S = 120.0


def layer_from_path(path: str) -> int | None:
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None


def _say(msg: str) -> None:
    try:
        print(f"parity: {msg}", file=sys.stderr, flush=True)
    except Exception:  # stderr closed: nothing left to tell
        pass


def _storable(dtype: torch.dtype) -> bool:
    try:
        st_code(dtype)
    except TypeError:
        return False
    return True


def unsupported(t: torch.Tensor) -> str | None:
    """What kind of tensor ``t`` is when a dump cannot hold it, else None.
    Checked before anything is copied: such a tensor fails in the writer,
    long after the hook, where it would take its whole shard with it."""
    if t.is_nested:
        return "nested tensors"
    if t.layout != torch.strided:
        return f"{str(t.layout).removeprefix('torch.')} tensors"
    if t.is_quantized:
        return "quantized tensors"
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return f"{type(t).__name__} tensors (a tensor subclass)"
    if t.device.type not in ("cpu", "cuda"):
        return f"tensors on {t.device.type}"
    if not _storable(t.dtype):
        return f"{dtype_name(t.dtype)} tensors"
    return None


class _Flush:
    """A flush request; the writer sets ``done`` once what came before is on disk."""
    __slots__ = ("done",)

    def __init__(self):
        self.done = threading.Event()


class CaptureSession:
    def __init__(self, config: CaptureConfig, run_info: dict | None = None):
        self.config = config
        self.writer = DumpWriter(config.dump_dir, config.rank, config.world_size,
                                 if_exists=config.if_exists,
                                 run_info={"capture": config.describe(), **(run_info or {})})
        self.root = self.writer.root
        self.active = True
        self.errors = 0
        self.context: dict = {"phase": None, "step": None, "meta": {}}
        self.generation = 0          # bumps on every context change; resets call counters
        self.bytes_queued = 0
        self.skipped_in_graph = 0
        self.skipped = 0             # records seen but not written: unsupported, failed, inside a graph
        self._skipped_kinds: set[str] = set()
        self.incomplete: str | None = None  # why the dump will not be whole, once known
        self._write_failed = False   # the disk failed: later records are dropped, not written
        self._stalled = False        # a wait gave up on the writer: later waits do not start again
        self._closed = False
        self._pid = os.getpid()      # a forked child inherits the session but owns none of its files
        self._beat = 0               # items the writer has taken: its progress, with the bytes it wrote
        self._tap_calls: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        # The bound counts records, not queue items: a group of CUDA records
        # takes one slot per record, so PARITY_DUMP_QUEUE keeps its meaning.
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._batch: list = []
        self._batch_bytes = 0
        self._slots = threading.Semaphore(config.queue_size)
        self._group_records = max(1, min(_GROUP_RECORDS, config.queue_size))
        self._copy_streams: dict = {}
        self._pending: list = []
        self._pending_stream = None
        self._arena: torch.Tensor | None = None
        self._arena_used = 0
        self._pending_bytes = 0
        self._thread = threading.Thread(target=self._drain, name="parity-writer", daemon=True)
        self._thread.start()
        self.users = 0
        atexit.register(self.close)

    # ---- failure handling -------------------------------------------------
    def fail(self, exc: BaseException, where: str) -> None:
        """Turn capture off after a failure. Records taken before it are still
        written, unless the failure is the disk's own."""
        first = self._turn_off(f"capture failed while {where}: {type(exc).__name__}: {exc}", error=True)
        if first:
            kept = ("Records written so far are in" if self._write_failed or self._stalled
                    else "Records captured before it are still written to")
            _say(f"capture failed while {where}: {type(exc).__name__}: {exc}. "
                 f"Capture is now off; the program continues. {kept} {self.root}.")

    def stop(self, reason: str) -> None:
        if self._turn_off(f"capture stopped: {reason}"):
            _say(f"capture stopped: {reason}. Records captured before it are in {self.root}.")

    def _turn_off(self, why: str, error: bool = False) -> bool:
        with self._lock:
            self.errors += error
            first = self.active
            self.active = False
            if self.incomplete is None:
                self.incomplete = why
            if _tap_state.session is self:
                _tap_state.session = None
        return first

    def skip(self, key: str, kind: str, detail: str = "") -> None:
        """Leave one record out and go on; say so once per kind."""
        with self._lock:
            self.skipped += 1
            first = kind not in self._skipped_kinds
            self._skipped_kinds.add(kind)
        if first:
            _say(f"skipping {key}: {kind} cannot be captured{f' ({detail})' if detail else ''}. Capture goes on "
                 "for the other records; later records of this kind are skipped without a word "
                 "(run.json counts every skipped record in skipped_records).")

    # ---- context ----------------------------------------------------------
    def set_context(self, phase=None, step=None, **meta) -> None:
        if self._pending:
            self._ship_held()
        try:
            meta = _plain(meta)
        except Exception as exc:  # noqa: BLE001 - capture never raises into the host
            self.fail(exc, "setting the context")
            return
        self.context = {"phase": phase, "step": step, "meta": meta}
        self.generation += 1
        self._tap_calls.clear()

    def set_run_info(self, **info) -> None:
        try:
            self.writer.write_run_info(**_plain(info))
        except Exception as exc:  # noqa: BLE001 - capture never raises into the host
            self.fail(exc, "writing run.json")

    # ---- recording --------------------------------------------------------
    def tap(self, name: str, tensor, meta: dict) -> None:
        if not self.active or "taps" not in self.config.stages:
            return
        try:
            if not isinstance(tensor, torch.Tensor):
                try:
                    tensor = torch.as_tensor(tensor)
                except Exception as exc:  # noqa: BLE001 - a value that is no tensor: skip it, not capture
                    self.skip(f"{name}:tap", f"{type(tensor).__name__} values", f"{type(exc).__name__}: {exc}")
                    return
            layer = layer_from_path(name)
            if self.config.layers is not None and layer is not None and layer not in self.config.layers:
                return
            if self.config.modules is not None and not self.config.modules.search(name):
                return
            gen_calls = self._tap_calls.setdefault(name, [0])
            call = gen_calls[0]
            gen_calls[0] += 1
            if self.config.calls is not None and call not in self.config.calls:
                return
            self.record(name, "tap", "tap", layer, call, tensor, meta)
        except Exception as exc:  # noqa: BLE001
            self.fail(exc, f"recording tap {name}")

    def record(self, module: str, stage: str, cls: str, layer, call: int, t: torch.Tensor,
               extra_meta: dict | None = None) -> None:
        if _capturing_graph(t):
            self._skip_in_graph(module, stage)
            return
        kind = unsupported(t)
        if kind is not None:
            self.skip(f"{module}:{stage}", kind)
            return
        ctx = self.context
        meta = dict(ctx["meta"])
        if extra_meta:
            meta.update(_plain(extra_meta))
        cfg = self.config
        t = t.detach()
        if cfg.mode == "sample":
            t, info = _sample(t, meta, cfg.sample_tokens)
            if info:
                meta.update(info)
        rec = Record(key=f"{module}:{stage}", module=module, stage=stage, cls=cls, layer=layer, call=call,
                     phase=ctx["phase"], step=ctx["step"], rank=cfg.rank, world_size=cfg.world_size,
                     shape=list(t.shape), dtype=dtype_name(t.dtype), meta=meta)
        stream = torch.cuda.current_stream(t.device) if t.is_cuda else None
        if self._pending and stream is not None and stream != self._pending_stream:
            self._ship_pending()  # one group, one stream: the group's event then covers all its work
        payload = summary = None
        if cfg.mode == "stats":
            rec.kind = "stats"
            summary = self._summary(t, rec.key)
            if summary is None:
                return
        else:
            nbytes = t.numel() * t.element_size()
            if cfg.max_bytes is not None and self.bytes_queued + nbytes > cfg.max_bytes:
                self.stop(f"PARITY_DUMP_MAX_BYTES budget of {cfg.max_bytes} bytes reached at {rec.key}")
                return
            self.bytes_queued += nbytes
            # A copy, never an alias: the host may mutate the tensor in place later.
            if t.is_cuda and nbytes <= _ARENA_BYTES // 4:
                payload = self._arena_copy(t, nbytes)
            else:
                payload = t.clone(memory_format=torch.contiguous_format)
            if t.is_cuda:
                # Summaries are nearly free on the GPU and slow on the writer's CPU.
                summary = self._summary(t, rec.key)
                if summary is None:
                    return
        with self._lock:
            if not self.active:
                return
            rec.seq = self.writer.next_seq()
        if t.is_cuda:
            if not self._pending:
                self._pending_stream = stream
            self._pending.append((rec, payload, summary))
            self._pending_bytes += 0 if payload is None else nbytes
            if len(self._pending) >= self._group_records or self._pending_bytes >= _GROUP_BYTES:
                self._ship_pending()
        else:
            if self._pending:
                self._ship_pending()  # keep the queue in record order
            if self._take_slot():
                self._queue.put(([(rec, payload, summary)], None, None))

    def _summary(self, t: torch.Tensor, key: str):
        try:
            return stats_vector(t)
        except Exception as exc:  # noqa: BLE001 - one record's summary, not capture, has failed
            self.skip(key, "tensors whose summary fails", f"{type(exc).__name__}: {exc}")
            return None

    def _take_slot(self) -> bool:
        """A place in the writer's queue: the host waits for the disk here,
        but never for a writer that has stopped moving."""
        if self._wait(lambda s: self._slots.acquire(timeout=s)):
            return True
        self.fail(TimeoutError(f"the writer made no progress for {_STALL_S:.0f} s"), "waiting for the disk")
        return False

    def _wait(self, ready) -> bool:
        """Call ``ready(timeout)`` until it is true; False once the writer has
        died or has made no progress for _STALL_S seconds."""
        if self._stalled:
            return ready(0)
        mark, since = self._progress(), time.monotonic()
        while not ready(0.1):
            if not self._thread.is_alive():
                return ready(0)
            now = self._progress()
            if now != mark:
                mark, since = now, time.monotonic()
            elif time.monotonic() - since > _STALL_S:
                self._stalled = True
                return False
        return True

    def _progress(self) -> tuple[int, int]:
        return self._beat, self.writer.progress

    def _skip_in_graph(self, module: str, stage: str) -> None:
        # Copies, summaries and events cannot go into a CUDA graph being
        # captured, and a graph's replays never run Python hooks: record
        # nothing here, keep capture on for the eager forwards, say so once.
        self.skipped_in_graph += 1
        self.skipped += 1
        if self.skipped_in_graph == 1:
            _say(f"{module}:{stage} ran while a CUDA graph was being captured; such records are skipped, and "
                 "replays of the graph are never recorded. Capture records eager forwards only: run the model "
                 "without CUDA graphs while capturing (vLLM enforce_eager=True, SGLang --disable-cuda-graph).")

    def _ship_pending(self) -> None:
        """Hand the held CUDA records to the writer as one group: their
        summaries go to pinned host memory in one non-blocking copy on the
        model's stream, behind one event. The writer waits on the event, never
        on the stream, so it cannot stall the host while the forward runs, and
        it wakes once per group rather than once per record."""
        items, self._pending, self._pending_bytes = self._pending, [], 0
        arena = None if self._arena is None else self._arena[:self._arena_used]
        self._arena, self._arena_used = None, 0
        if not items or self._write_failed:
            return
        stream = self._pending_stream
        with torch.cuda.stream(stream):  # where the group's copies and summaries were made
            sums = torch.stack([summary for _, _, summary in items])
            host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
            host.copy_(sums, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        for i in range(len(items)):
            if not self._take_slot():
                for _ in range(i):
                    self._slots.release()
                return
        self._queue.put(([(rec, payload, host[i]) for i, (rec, payload, _) in enumerate(items)], event, arena))

    def _arena_copy(self, t: torch.Tensor, nbytes: int) -> torch.Tensor:
        """Copy a small CUDA tensor into the current group's arena, so the
        writer brings the whole group to the host in one transfer instead of
        one pinned allocation, copy and sync per record."""
        off = (self._arena_used + 15) & ~15
        if self._arena is None or off + nbytes > self._arena.numel():
            if self._arena is not None:
                self._ship_pending()  # the arena travels with its group
            self._arena = torch.empty(_ARENA_BYTES, dtype=torch.uint8, device=t.device)
            off = 0
        self._arena_used = off + nbytes
        dst = self._arena[off:off + nbytes].view(t.dtype).view(t.shape)
        dst.copy_(t)
        return dst

    # ---- writer thread ----------------------------------------------------
    def _to_host(self, payload: torch.Tensor) -> torch.Tensor:
        """Copy a device tensor to pinned host memory on a side stream, so the
        copy neither queues behind the model's kernels nor holds them up."""
        stream = self._copy_streams.get(payload.device)
        if stream is None:
            stream = self._copy_streams[payload.device] = torch.cuda.Stream(device=payload.device)
        cpu = torch.empty(payload.shape, dtype=payload.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            cpu.copy_(payload, non_blocking=True)
        stream.synchronize()
        return cpu

    def _drain(self) -> None:
        # One intra-op thread here (the setting is per thread): the host's own
        # thread pool already fills the cores, and a second pool spinning
        # beside it slows the model far more than the writer gains.
        torch.set_num_threads(1)
        due = None  # when the oldest unwritten record must be on disk
        while True:
            try:
                item = self._queue.get(timeout=None if due is None else max(0.0, due - time.monotonic()))
            except queue.Empty:
                item = _DUE
            self._beat += 1
            if isinstance(item, tuple):
                try:
                    self._take(*item)
                except Exception as exc:  # noqa: BLE001 - a device copy failed: nothing more can be written
                    self._write_fail(exc, "bringing records to the host")
                finally:
                    for _ in item[0]:
                        self._slots.release()
                item = None  # let the device copies go now
                # Group commit: one shard and one fsync'd manifest append per
                # _MAX_DELAY_S, not per record, so a stream of small records
                # costs the host neither fsyncs nor the writer's GIL time.
                if not self._batch:
                    due = None
                elif due is None:
                    due = time.monotonic() + _MAX_DELAY_S
                continue
            # _DUE, a flush or the stop: write what is waiting. _commit never
            # raises, so the stop is always obeyed and close() always returns.
            self._commit()
            due = None
            if isinstance(item, _Flush):
                item.done.set()
            elif item is _STOP:
                return

    def _take(self, group, event, arena) -> None:
        """Bring one group of records to the host and add them to the batch."""
        if self._write_failed:
            return  # the disk failed: drain, so the host never blocks
        if event is not None:
            event.synchronize()  # the clones and the summaries are done
        host_arena = None if arena is None else self._to_host(arena)
        for rec, payload, summary in group:
            if summary is not None:
                rec.stats = stats_from_vector(summary)
            if rec.kind == "stats":
                self._batch.append((rec, None))
                continue
            if host_arena is not None and payload.is_cuda and \
                    payload.untyped_storage().data_ptr() == arena.data_ptr():
                start = payload.data_ptr() - arena.data_ptr()
                cpu = host_arena[start:start + payload.numel() * payload.element_size()]
                cpu = cpu.view(payload.dtype).view(payload.shape)
            elif payload.is_cuda:
                cpu = self._to_host(payload)
            else:
                cpu = payload
            self.writer.digest_soon(rec, cpu)
            self._batch.append((rec, cpu))
            self._batch_bytes += cpu.numel() * cpu.element_size()
            if self._batch_bytes >= _FLUSH_BYTES:
                self._commit()

    def _commit(self) -> None:
        """Write the batch as one shard. Never raises: a failure of the disk
        turns capture off; a failure of one record skips that record only."""
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if not batch or self._write_failed:
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
                self.skip(rec.key, "records that fail to write", f"{type(exc).__name__}: {exc}")

    def _write_fail(self, exc: BaseException, where: str) -> None:
        self._write_failed = True
        self._batch, self._batch_bytes = [], 0
        self.writer.drop_early()
        self.fail(exc, where)

    def flush(self) -> None:
        """Wait until everything recorded so far is on disk."""
        if self._closed or not self._thread.is_alive():
            return
        self._ship_held()
        request = _Flush()
        self._queue.put(request)
        if not self._wait(request.done.wait):
            self.fail(TimeoutError(f"the writer made no progress for {_STALL_S:.0f} s"), "flushing")

    def _ship_held(self) -> None:
        try:
            self._ship_pending()
        except Exception as exc:  # noqa: BLE001
            self._pending = []
            self.fail(exc, "handing records to the writer")

    def close(self) -> None:
        """Write what is queued, then finish run.json: complete, or why not.
        Returns once the writer is done, or has made no progress for _STALL_S."""
        with self._lock:
            if self._closed or os.getpid() != self._pid:
                return
            self._closed = True
        atexit.unregister(self.close)
        self._ship_held()
        self._queue.put(_STOP)
        finished = self._wait(lambda s: _ended(self._thread, s))
        with self._lock:
            self.active = False
            if _tap_state.session is self:
                _tap_state.session = None
        if not finished:
            self._abandon()
            return
        extra = {"skipped_records": self.skipped} if self.skipped else {}
        try:
            self.writer.close(self.incomplete, **extra)
        except Exception as exc:  # noqa: BLE001
            self.errors += 1
            if not self._write_failed:  # else the failure has been told already
                _say(f"could not finish the dump in {self.root} ({type(exc).__name__}: {exc}); "
                     "it reads as incomplete.")
            return
        if self.writer.records_written == 0 and not self.skipped and self.incomplete is None:
            _say(f"no record was captured into {self.root}: no selected module ran, or PARITY_DUMP_CALLS / "
                 "PARITY_DUMP_STAGES exclude every call ('parity env' shows the settings).")

    def _abandon(self) -> None:
        """The writer is stuck (a hung filesystem): leave it the files and
        the folder's lock and let the host go on. Nothing more is written
        (it would hang too): run.json keeps "complete": false."""
        _say(f"the writer made no progress for {_STALL_S:.0f} s; close() gave up on it. "
             f"The dump in {self.root} is incomplete.")


def _ended(thread: threading.Thread, timeout: float) -> bool:
    thread.join(timeout)
    return not thread.is_alive()


def _capturing_graph(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _plain(d: dict) -> dict:
    """Make context values JSON values: tensors and arrays become lists,
    anything else JSON cannot hold its str(). A value that could not be
    serialised would otherwise fail every manifest line that carries it."""
    return json.loads(json.dumps(d, default=_jsonable))


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().tolist()
    if hasattr(v, "tolist"):  # numpy arrays and scalars
        return v.tolist()
    if isinstance(v, (set, frozenset)):
        return sorted(v, key=repr)
    return str(v)


def _sample(t: torch.Tensor, meta: dict, n: int):
    """First and last ``n`` tokens of each sequence, along the token dim."""
    cu = meta.get("cu_seqlens")
    if cu and t.dim() >= 1 and t.shape[0] == cu[-1]:
        idx, new_cu = [], [0]
        for s, e in zip(cu[:-1], cu[1:]):
            rows = sorted(set(range(s, min(e, s + n))) | set(range(max(s, e - n), e)))
            idx.extend(rows)
            new_cu.append(new_cu[-1] + len(rows))
        index = torch.tensor(idx, dtype=torch.long, device=t.device)
        return t.index_select(0, index), {"cu_seqlens": new_cu, "sample": {"n": n, "dim": 0, "orig_cu_seqlens": cu}}
    dim = 1 if t.dim() >= 3 else 0
    if t.dim() == 0 or t.shape[dim] <= 2 * n:
        return t, None
    length = t.shape[dim]
    keep = torch.cat([torch.arange(n), torch.arange(length - n, length)]).to(t.device)
    return t.index_select(dim, keep), {"sample": {"n": n, "dim": dim, "orig_len": length}}
