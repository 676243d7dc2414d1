"""CUDA staging: device copies held in groups behind one event, and brought
to pinned host memory on a side stream.

The hook's thread copies each CUDA record on the device (small ones side by
side in one arena) and holds it; a group travels to the writer when it is
full, when the stream or the context changes, or on flush and close. The
writer's thread then waits on the group's event, never on the model's
stream, so it cannot stall the host while the forward runs, and it wakes
once per group rather than once per record.

``copy``, ``hold`` and ``ship`` run in the hook's thread; ``land`` and
``to_host`` in the writer's. They share nothing but the groups handed over.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from parity.capture.pipeline import Entry, Group


class Staging:
    def __init__(self, *, group_records: int, group_bytes: int, arena_bytes: int,
                 send: Callable[[Group], None], dropped: Callable[[], bool]):
        self._group_records = group_records
        self._group_bytes = group_bytes
        self._arena_bytes = arena_bytes
        self._send = send
        self._dropped = dropped    # nothing more will be written: build no group
        self._entries: list[Entry] = []
        self._bytes = 0
        self._stream = None
        self._arena: torch.Tensor | None = None
        self._arena_used = 0
        self._copy_streams: dict = {}  # the writer's side streams, one per device

    @property
    def holding(self) -> bool:
        return bool(self._entries)

    # ---- the hook's thread --------------------------------------------------
    def use_stream(self, stream) -> None:
        """One group, one stream: the group's event then covers all its work."""
        if self._entries and stream != self._stream:
            self.ship()

    def copy(self, t: torch.Tensor, nbytes: int) -> torch.Tensor:
        """A copy of the CUDA tensor ``t`` the host can no longer change."""
        if nbytes <= self._arena_bytes // 4:
            return self._arena_copy(t, nbytes)
        return t.clone(memory_format=torch.contiguous_format)

    def hold(self, entry: Entry, nbytes: int, stream) -> None:
        """Keep ``entry`` for the current group; ship the group once it is full."""
        if not self._entries:
            self._stream = stream
        self._entries.append(entry)
        self._bytes += nbytes
        if len(self._entries) >= self._group_records or self._bytes >= self._group_bytes:
            self.ship()

    def ship(self) -> None:
        """Send the held records as one group: their summaries go to pinned
        host memory in one non-blocking copy on the stream that made them,
        behind one event."""
        entries, self._entries, self._bytes = self._entries, [], 0
        arena = None if self._arena is None else self._arena[:self._arena_used]
        self._arena, self._arena_used = None, 0
        if not entries or self._dropped():
            return
        stream = self._stream
        with torch.cuda.stream(stream):
            sums = torch.stack([e.summary for e in entries])
            host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
            host.copy_(sums, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        self._send(Group(tuple(Entry(e.record, e.payload, host[i]) for i, e in enumerate(entries)), event, arena))

    def _arena_copy(self, t: torch.Tensor, nbytes: int) -> torch.Tensor:
        # One arena per group, so the writer brings the whole group to the
        # host in one transfer instead of one pinned allocation, copy and
        # sync per record.
        off = (self._arena_used + 15) & ~15
        if self._arena is None or off + nbytes > self._arena.numel():
            if self._arena is not None:
                self.ship()  # the arena travels with its group
            self._arena = torch.empty(self._arena_bytes, dtype=torch.uint8, device=t.device)
            off = 0
        self._arena_used = off + nbytes
        dst = self._arena[off:off + nbytes].view(t.dtype).view(t.shape)
        dst.copy_(t)
        return dst

    # ---- the writer's thread ----------------------------------------------------
    def land(self, group: Group) -> Iterator[torch.Tensor | None]:
        """The host copies of ``group``'s payloads, in entry order, once its
        event has fired. CPU payloads and None pass through as they are."""
        if group.ready is not None:
            group.ready.synchronize()  # the copies and the summaries are done
        arena = group.arena
        host_arena = None if arena is None else self.to_host(arena)
        for entry in group.entries:
            payload = entry.payload
            if payload is None or not payload.is_cuda:
                yield payload
            elif host_arena is not None and payload.untyped_storage().data_ptr() == arena.data_ptr():
                start = payload.data_ptr() - arena.data_ptr()
                cpu = host_arena[start:start + payload.numel() * payload.element_size()]
                yield cpu.view(payload.dtype).view(payload.shape)
            else:
                yield self.to_host(payload)

    def to_host(self, payload: torch.Tensor) -> torch.Tensor:
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
