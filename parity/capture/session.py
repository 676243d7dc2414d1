"""A capture session: what to record, the context it is recorded in, and
what a failure does.

The host program must never see an exception from here. Every failure is
caught, reported once on stderr, and turns capture off; the model keeps
running and returns the same outputs. A tensor capture cannot store (complex,
sparse, on the meta device, ...) is skipped with one message per kind, and
capture goes on for the others. No wait on the writer is unbounded: close(),
flush() and a full queue give up once the writer has made no progress for
_STALL_S seconds.

The hooks' records go to the writer pipeline (pipeline.py) directly from
the CPU, and through CUDA staging (staging.py) from a GPU.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import sys
import threading

import torch

from parity.capture.pipeline import Entry, Group, Pipeline
from parity.capture.staging import Staging
from parity.capture.taps import state as _tap_state
from parity.config import CaptureConfig
from parity.store.schema import Record, dtype_name, st_code
from parity.store.stats import stats_vector
from parity.store.writer import DumpWriter

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")
# A record reaches the disk at most _MAX_DELAY_S after the writer took it,
# sooner once _FLUSH_BYTES are waiting, or on flush() / close().
_FLUSH_BYTES = 64 << 20
_MAX_DELAY_S = 0.25
# CUDA records wait in the hook's thread until this many (or this many bytes
# of copies) are held, or the context changes, then travel as one group.
_GROUP_RECORDS = 64
_GROUP_BYTES = 256 << 20
# Small CUDA records are copied side by side into one buffer of this size.
_ARENA_BYTES = 4 << 20
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
        self._closed = False
        self._pid = os.getpid()      # a forked child inherits the session but owns none of its files
        self._tap_calls: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        # A group takes one queue slot per record, so it can be no larger than the queue.
        self._staging = Staging(group_records=max(1, min(_GROUP_RECORDS, config.queue_size)),
                                group_bytes=_GROUP_BYTES, arena_bytes=_ARENA_BYTES,
                                send=self._send, dropped=lambda: self._pipeline.failed)
        self._pipeline = Pipeline(self.writer, slots=config.queue_size, flush_bytes=_FLUSH_BYTES,
                                  max_delay_s=_MAX_DELAY_S, stall_s=_STALL_S, land=self._staging.land,
                                  on_fail=self.fail, on_skip=self.skip)
        self.users = 0
        atexit.register(self.close)

    # The writer's device-to-host copy, replaceable here so that a caller can
    # watch the transfers (bench/bench_capture.py times them).
    @property
    def _to_host(self):
        return self._staging.to_host

    @_to_host.setter
    def _to_host(self, fn) -> None:
        self._staging.to_host = fn

    # ---- failure handling -------------------------------------------------
    def fail(self, exc: BaseException, where: str) -> None:
        """Turn capture off after a failure. Records taken before it are still
        written, unless the failure is the disk's own."""
        first = self._turn_off(f"capture failed while {where}: {type(exc).__name__}: {exc}", error=True)
        if first:
            kept = ("Records written so far are in" if self._pipeline.failed or self._pipeline.stalled
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

    def _stalled(self, where: str) -> None:
        self.fail(TimeoutError(f"the writer made no progress for {self._pipeline.stall_s:.0f} s"), where)

    # ---- context ----------------------------------------------------------
    def set_context(self, phase=None, step=None, **meta) -> None:
        if self._staging.holding:
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
        t, meta = self._selected(t.detach(), ctx["meta"], extra_meta)
        key = f"{module}:{stage}"
        stream = torch.cuda.current_stream(t.device) if t.is_cuda else None
        if stream is not None:
            self._staging.use_stream(stream)
        carried = self._carried(t, key)
        if carried is None:
            return
        with self._lock:
            if not self.active:
                return
            seq = self.writer.next_seq()
        rec = Record(key=key, module=module, stage=stage, cls=cls, layer=layer, call=call,
                     phase=ctx["phase"], step=ctx["step"], rank=self.config.rank,
                     world_size=self.config.world_size, shape=list(t.shape), dtype=dtype_name(t.dtype),
                     kind="stats" if self.config.mode == "stats" else "tensor", meta=meta, seq=seq)
        payload, summary, nbytes = carried
        entry = Entry(rec, payload, summary)
        if stream is not None:
            self._staging.hold(entry, nbytes, stream)
            return
        if self._staging.holding:
            self._staging.ship()  # keep the queue in record order
        self._send(Group((entry,)))

    def _selected(self, t: torch.Tensor, context_meta: dict, extra_meta: dict | None):
        """The tensor as the mode keeps it, and the record's metadata."""
        meta = dict(context_meta)
        if extra_meta:
            meta.update(_plain(extra_meta))
        if self.config.mode == "sample":
            t, info = _sample(t, meta, self.config.sample_tokens)
            if info:
                meta.update(info)
        return t, meta

    def _carried(self, t: torch.Tensor, key: str):
        """(payload, summary, payload bytes) of one record, or None when it is not written."""
        cfg = self.config
        if cfg.mode == "stats":
            summary = self._summary(t, key)
            return None if summary is None else (None, summary, 0)
        nbytes = t.numel() * t.element_size()
        if cfg.max_bytes is not None and self.bytes_queued + nbytes > cfg.max_bytes:
            self.stop(f"PARITY_DUMP_MAX_BYTES budget of {cfg.max_bytes} bytes reached at {key}")
            return None
        self.bytes_queued += nbytes
        if not t.is_cuda:
            # A copy, never an alias: the host may mutate the tensor in place later.
            return t.clone(memory_format=torch.contiguous_format), None, nbytes
        payload = self._staging.copy(t, nbytes)
        # Summaries are nearly free on the GPU and slow on the writer's CPU.
        summary = self._summary(t, key)
        return None if summary is None else (payload, summary, nbytes)

    def _summary(self, t: torch.Tensor, key: str):
        try:
            return stats_vector(t)
        except Exception as exc:  # noqa: BLE001 - one record's summary, not capture, has failed
            self.skip(key, "tensors whose summary fails", f"{type(exc).__name__}: {exc}")
            return None

    def _send(self, group: Group) -> None:
        """Hand ``group`` to the writer: the host waits for the disk here,
        but never for a writer that has stopped moving."""
        if not self._pipeline.put(group):
            self._stalled("waiting for the disk")

    def _ship_held(self) -> None:
        try:
            self._staging.ship()
        except Exception as exc:  # noqa: BLE001
            self.fail(exc, "handing records to the writer")

    # ---- the end ------------------------------------------------------------
    def flush(self) -> None:
        """Wait until everything recorded so far is on disk."""
        if self._closed or not self._pipeline.alive:
            return
        self._ship_held()
        if not self._pipeline.flush():
            self._stalled("flushing")

    def close(self) -> None:
        """Write what is queued, then finish run.json: complete, or why not.
        Returns once the writer is done, or has made no progress for _STALL_S."""
        with self._lock:
            if self._closed or os.getpid() != self._pid:
                return
            self._closed = True
        atexit.unregister(self.close)
        self._ship_held()
        finished = self._pipeline.finish()
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
            if not self._pipeline.failed:  # else the failure has been told already
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
        _say(f"the writer made no progress for {self._pipeline.stall_s:.0f} s; close() gave up on it. "
             f"The dump in {self.root} is incomplete.")


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
