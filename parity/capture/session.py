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

import torch

from parity.capture.taps import state as _tap_state
from parity.config import CaptureConfig
from parity.store.schema import Record, dtype_name
from parity.store.stats import stats_from_vector, stats_vector
from parity.store.writer import DumpWriter

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")
_FLUSH_BYTES = 64 << 20
_STOP = object()


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
        self._tap_calls: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self._copy_stream = None
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
            payload = t.clone(memory_format=torch.contiguous_format)
            if t.is_cuda:
                # Summaries are nearly free on the GPU and slow on the writer's CPU.
                summary = stats_vector(t)
        event = None
        if t.is_cuda:
            # The summary travels to pinned host memory on the model's stream,
            # without a sync; the writer waits on the event, never on the
            # stream, so it cannot stall the host while the forward runs.
            host = torch.empty(summary.shape, dtype=summary.dtype, pin_memory=True)
            host.copy_(summary, non_blocking=True)
            summary = host
            event = torch.cuda.Event()
            event.record()
        with self._lock:
            if not self.active:
                return
            rec.seq = self.writer.next_seq()
        self._queue.put((rec, payload, summary, event))

    # ---- writer thread ----------------------------------------------------
    def _to_host(self, payload: torch.Tensor) -> torch.Tensor:
        """Copy a device tensor to pinned host memory on a side stream, so the
        copy neither queues behind the model's kernels nor holds them up."""
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=payload.device)
        cpu = torch.empty(payload.shape, dtype=payload.dtype, pin_memory=True)
        with torch.cuda.stream(self._copy_stream):
            cpu.copy_(payload, non_blocking=True)
        self._copy_stream.synchronize()
        return cpu

    def _drain(self) -> None:
        # One intra-op thread here (the setting is per thread): the host's own
        # thread pool already fills the cores, and a second pool spinning
        # beside it slows the model far more than the writer gains.
        torch.set_num_threads(1)
        batch: list = []
        batch_bytes = 0
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    if batch and self.errors == 0:
                        self.writer.write_batch(batch)
                    return
                if self.errors:
                    continue  # failed: keep draining so the host never blocks
                rec, payload, summary, event = item
                if event is not None:
                    event.synchronize()  # the clone and the summary are done
                if summary is not None:
                    rec.stats = stats_from_vector(summary)
                if rec.kind == "stats":
                    batch.append((rec, None))
                else:
                    cpu = self._to_host(payload) if payload.is_cuda else payload
                    del payload
                    batch.append((rec, cpu))
                    batch_bytes += cpu.numel() * cpu.element_size()
                if batch_bytes >= _FLUSH_BYTES or self._queue.empty():
                    self.writer.write_batch(batch)
                    batch, batch_bytes = [], 0
            except Exception as exc:  # noqa: BLE001 - disk full, permissions, ...
                batch, batch_bytes = [], 0
                self.fail(exc, "writing the dump")
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until everything recorded so far is on disk."""
        if self._thread.is_alive():
            self._queue.join()

    def close(self) -> None:
        if self._thread.is_alive():
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
