"""A capture session: what to record, the current context, the writer thread.

The host program must never see an exception from here. Every failure is
caught, reported once on stderr, and turns capture off; the model keeps
running and returns the same outputs.
"""

from __future__ import annotations

import atexit
import queue
import re
import sys
import threading
import time

import torch

from parity.capture.taps import state as _tap_state
from parity.config import CaptureConfig
from parity.store.schema import Record, dtype_name
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
_FLUSH = object()
# A record reaches the disk at most this long after the writer took it
# (sooner when 64 MB are waiting, or on flush() / close()).
_MAX_DELAY_S = 0.25


def layer_from_path(path: str) -> int | None:
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None


def _say(msg: str) -> None:
    try:
        print(f"parity: {msg}", file=sys.stderr, flush=True)
    except Exception:  # stderr closed: nothing left to tell
        pass


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
        self._tap_calls: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        # The bound counts records, not queue items: a group of CUDA records
        # takes one slot per record, so PARITY_DUMP_QUEUE keeps its meaning.
        self._queue: queue.Queue = queue.Queue()
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
        with self._lock:
            self.errors += 1
            first = self.active
            self.active = False
            self._pending = []  # held device copies are freed, not written
            if _tap_state.session is self:
                _tap_state.session = None
        if first:
            _say(f"capture failed while {where}: {type(exc).__name__}: {exc}. "
                 f"Capture is now off; the program continues. Records written so far are in {self.root}.")

    def stop(self, reason: str) -> None:
        with self._lock:
            first = self.active
            self.active = False
            if _tap_state.session is self:
                _tap_state.session = None
        if first:
            _say(f"capture stopped: {reason}. Records written so far are in {self.root}.")

    # ---- context ----------------------------------------------------------
    def set_context(self, phase=None, step=None, **meta) -> None:
        if self._pending:
            self._ship_held()
        self.context = {"phase": phase, "step": step, "meta": _plain(meta)}
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
                tensor = torch.as_tensor(tensor)
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
            summary = stats_vector(t)
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
                summary = stats_vector(t)
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
            self._slots.acquire()
            self._queue.put(([(rec, payload, summary)], None, None))

    def _skip_in_graph(self, module: str, stage: str) -> None:
        # Copies, summaries and events cannot go into a CUDA graph being
        # captured, and a graph's replays never run Python hooks: record
        # nothing here, keep capture on for the eager forwards, say so once.
        self.skipped_in_graph += 1
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
        if not items or self.errors:
            return
        stream = self._pending_stream
        with torch.cuda.stream(stream):  # where the group's copies and summaries were made
            sums = torch.stack([summary for _, _, summary in items])
            host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
            host.copy_(sums, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        for _ in items:
            self._slots.acquire()
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
        batch: list = []
        batch_bytes = 0
        due = None  # when the oldest unwritten record must be on disk
        while True:
            try:
                item = self._queue.get(timeout=None if due is None else max(0.0, due - time.monotonic()))
                taken = True
            except queue.Empty:
                item, taken = _FLUSH, False
            slots = len(item[0]) if isinstance(item, tuple) else 0
            try:
                if item is _STOP or item is _FLUSH:
                    if batch and self.errors == 0:
                        self.writer.write_batch(batch)
                    batch, batch_bytes, due = [], 0, None
                    if item is _STOP:
                        return
                    continue
                if self.errors:
                    continue  # failed: keep draining so the host never blocks
                group, event, arena = item
                if event is not None:
                    event.synchronize()  # the clones and the summaries are done
                host_arena = None if arena is None else self._to_host(arena)
                for rec, payload, summary in group:
                    if summary is not None:
                        rec.stats = stats_from_vector(summary)
                    if rec.kind == "stats":
                        batch.append((rec, None))
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
                    batch.append((rec, cpu))
                    batch_bytes += cpu.numel() * cpu.element_size()
                    if batch_bytes >= _FLUSH_BYTES:
                        self.writer.write_batch(batch)
                        batch, batch_bytes = [], 0
                item = group = payload = arena = None  # let the device copies go now
                # Group commit: one shard and one fsync'd manifest append per
                # _MAX_DELAY_S, not per record, so a stream of small records
                # costs the host neither fsyncs nor the writer's GIL time.
                if not batch:
                    due = None
                elif due is None:
                    due = time.monotonic() + _MAX_DELAY_S
            except Exception as exc:  # noqa: BLE001 - disk full, permissions, ...
                batch, batch_bytes, due = [], 0, None
                self.writer.drop_early()
                self.fail(exc, "writing the dump")
            finally:
                for _ in range(slots):
                    self._slots.release()
                if taken:
                    self._queue.task_done()

    def flush(self) -> None:
        """Wait until everything recorded so far is on disk."""
        if self._thread.is_alive():
            self._ship_held()
            self._queue.put(_FLUSH)
            self._queue.join()

    def _ship_held(self) -> None:
        try:
            self._ship_pending()
        except Exception as exc:  # noqa: BLE001
            self._pending = []
            self.fail(exc, "handing records to the writer")

    def close(self) -> None:
        if self._thread.is_alive():
            self._ship_held()
            self._queue.put(_STOP)
            self._thread.join()
        with self._lock:
            self.active = False
            if _tap_state.session is self:
                _tap_state.session = None
        try:
            self.writer.close()
        except Exception as exc:  # noqa: BLE001
            self.errors += 1
            _say(f"could not finish the dump in {self.root}: {exc}")
        atexit.unregister(self.close)


def _capturing_graph(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _plain(d: dict) -> dict:
    """Make context values JSON-friendly: tensors become lists."""
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().tolist()
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


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
