"""Bring records of two dumps to the same per-sequence view and pair them.

A record is cut into *pieces*, one per sequence it covers, using its layout
metadata (docs/CONTRACTS.md): ``[T, ...]`` with ``cu_seqlens`` is ragged,
``[B, S, ...]`` without it has one batch row per ``seq_ids`` entry.
Tensor-parallel shards (``meta.shard_dim``) are concatenated and partial
sums (``meta.shard_reduce: "sum"``) added when every rank is present; a
failing re-assembled shard is blamed on the ranks whose own part is off
(``shard_blame``). Pieces meet on (canonical key, phase, step, call, seq_id): never
on token counts, which coincide too easily to be evidence.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import torch

from parity.errors import ParityError
from parity.store.reader import Dump, open_dump
from parity.store.schema import Record

_PHASE_ORDER = {None: 0, "prefill": 1, "decode": 2}
# The layer prefix of a canonical key: "model.layers.3", "h.3", "L3".
_LAYER_PREFIX = re.compile(r"^(?:.*?(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)|L(\d+))(?=$|[.:])")


def resolve_mapping(map_file: str | None = None, preset: str | None = None, *, map_ref: str | None = None,
                    map_target: str | None = None, dumps=()):
    """The Mapping of ``--map FILE`` or ``--preset NAME``, plus the rules of
    ``--map-ref`` / ``--map-target`` for one side each. With neither --map
    nor --preset, the preset the runs declare (run.json ``mapping_preset``)
    applies when ``dumps`` agree on one; else identity."""
    from parity.compare.mapping import load_mapping, mapping_from_file, side_rules

    if map_file and preset:
        raise ParityError("give --map or --preset, not both")
    if not map_file and not preset:
        preset = declared_preset(dumps)
    m = mapping_from_file(map_file) if map_file else load_mapping(preset)
    for side, path in (("ref", map_ref), ("target", map_target)):
        if path:
            m = m.with_side(side, side_rules(path, side), name=f"{m.name} + {side} rules {path}")
    return m


def declared_preset(dumps) -> str | None:
    """The mapping preset the runs name in run.json (``mapping_preset``): the
    one they agree on; None when none names one. Runs that name different
    ones are bad input: the user must choose."""
    names = {d.run.get("mapping_preset") for d in dumps if isinstance(getattr(d, "run", None), dict)} - {None}
    if len(names) > 1:
        raise ParityError(f"the runs declare different mapping presets ({', '.join(sorted(map(str, names)))}); "
                          "give --preset or --map")
    return names.pop() if names else None


def as_dump(d) -> Dump:
    return d if isinstance(d, Dump) else open_dump(str(d))


def split_key(key: str, layer: int | None = None) -> tuple[int | None, str]:
    """(layer, stage inside the layer) of a canonical key:
    ``model.layers.3.self_attn:output`` -> (3, ``self_attn:output``), the
    layer's own output ``model.layers.3:output`` -> (3, ``output``)."""
    m = _LAYER_PREFIX.match(key)
    if not m:
        return layer, key
    n = int(m.group(1) or m.group(2))
    rest = key[m.end():].lstrip(".:")
    return (layer if layer is not None else n), rest or key


@dataclass
class Piece:
    """One sequence's slice of a record (or of its re-assembled TP shards)."""

    key: str                        # canonical key
    phase: str | None
    step: int | None
    call: int
    seq: int | None                 # seq_id; None when the record has no layout metadata
    rank: int | None                # None: whole tensor (single rank or re-assembled)
    recs: tuple[Record, ...]        # one record, or the shards in rank order
    shard_dim: int | None = None
    row: int | None = None          # batch row of a [B, S, ...] record
    span: tuple[int, int] | None = None   # token rows of a ragged record
    error: str | None = None        # layout metadata that cannot be trusted
    note: str | None = None
    reduce: str | None = None       # "sum": recs are partial sums, added up

    @property
    def rec(self) -> Record:
        return self.recs[0]

    @property
    def match(self) -> tuple:
        return (self.key, self.phase, self.step, self.call, self.seq)

    @property
    def order(self) -> tuple:
        r = self.rec
        return (_PHASE_ORDER.get(self.phase, 3), self.step or 0, r.seq, self.seq if self.seq is not None else -1,
                self.rank if self.rank is not None else -1)

    def load(self, dump: Dump) -> torch.Tensor:
        """The piece as a tensor with leading singleton dims removed. A view
        into the memory map unless shards had to be concatenated."""
        return squeeze_leading(self._gather(dump))

    def _gather(self, dump: Dump) -> torch.Tensor:
        parts = []
        for rec in self.recs:
            parts.append(take(dump.load(rec), self.row, self.span))
        if len(parts) == 1:
            t = parts[0]
        elif self.reduce == "sum":
            # exact in float64, then the one rounding the all-reduce makes
            t = torch.stack([p.double() for p in parts]).sum(0).to(parts[0].dtype)
        else:
            d = self.shard_dim
            if self.row is not None and d is not None and d >= 0:
                d -= 1  # the batch dim is gone
            t = torch.cat(parts, dim=d)
        return t


@dataclass
class Stitched(Piece):
    """A sequence's prompt computed in several prefill chunks, stitched back
    into one piece in position order."""

    parts: tuple = ()

    def _gather(self, dump: Dump) -> torch.Tensor:
        parts = [p._gather(dump) for p in self.parts]
        if len({t.shape[1:] for t in parts}) > 1:
            if any(t.is_floating_point() for t in parts) or any(t.dim() != 2 for t in parts):
                raise ShapeMismatch(f"prefill chunks of shapes {[list(t.shape) for t in parts]} cannot be stitched")
            # index rows (a top-k) padded with -1 to each forward's widest: the sets are what count
            w = max(t.shape[1] for t in parts)
            parts = [torch.nn.functional.pad(t, (0, w - t.shape[1]), value=-1) for t in parts]
        return torch.cat(parts, dim=0)


def prompt_lens(dump: Dump) -> list[int] | None:
    run = dump.run if isinstance(dump.run, dict) else {}
    if isinstance(run.get("prompt_lens"), list):
        return run["prompt_lens"]
    ids, gen = run.get("token_ids"), run.get("generated")
    if not (isinstance(ids, list) and all(isinstance(t, list) for t in ids)):
        return None
    if isinstance(gen, list) and len(gen) == len(ids) and all(isinstance(g, list) for g in gen):
        return [len(t) - len(g) for t, g in zip(ids, gen)]  # token_ids hold the generated tokens too
    return [len(t) for t in ids]


def position_label(rec: Record, seq: int | None, lens: list[int] | None):
    """(phase, step, start) of sequence ``seq``'s rows in ``rec`` by absolute
    position, when the forward declared its first positions: prompt rows are
    prefill step 0, the row at position p of a prompt of P tokens is decode
    step p - P + 1. Otherwise the record's own labels and start None."""
    starts = rec.meta.get("start_positions")
    if (lens is None or starts is None or seq is None or not 0 <= seq < len(lens)
            or len(starts) != len(rec.seq_ids or ()) or seq not in rec.seq_ids):
        return rec.phase, rec.step, None
    start = starts[rec.seq_ids.index(seq)]
    if start >= lens[seq]:
        return "decode", start - lens[seq] + 1, start
    return "prefill", 0, start


def _by_position(pieces: list[Piece], dump: Dump) -> tuple[list[Piece], int]:
    """Pieces of ragged per-token records whose forward declares each
    sequence's first position (``start_positions``) re-labelled by absolute
    position: rows of the prompt are prefill, a row at position p of a
    prompt of P tokens is decode step p - P + 1, whichever forward computed
    it; a prompt split over several forwards (chunked prefill) is stitched
    back into one piece. Returns the pieces and how many prompts were stitched."""
    lens = prompt_lens(dump)
    if lens is None:
        return pieces, 0
    out, chunks, last_rows = [], defaultdict(list), {}
    for p in pieces:
        phase, step, start = position_label(p.rec, p.seq, lens)
        if start is None or p.error:
            out.append(p)
            continue
        if phase == "decode":
            out.append(replace(p, phase=phase, step=step))
            continue
        r, plen = p.rec, lens[p.seq]
        if r.meta.get("rows") == "entries":
            # compressed entries a chunk emitted: in order, whatever their count
            chunks[(p.key, p.call, p.seq, p.rank, "entries")].append((start, None, p))
            continue
        if not _per_token(r) or p.span is None:
            # one row per forward (a chunk's last row): the prompt's is the last chunk's
            k = (p.key, p.call, p.seq, p.rank)
            if k not in last_rows or start > last_rows[k][0]:
                last_rows[k] = (start, replace(p, phase="prefill", step=0))
            continue
        n = p.span[1] - p.span[0]
        if start + n > plen:
            out.append(replace(p, error=f"rows {start}..{start + n - 1} run past the prompt's {plen} tokens"))
        else:
            chunks[(p.key, p.call, p.seq, p.rank, "tokens")].append((start, n, p))
    out += [p for _, p in last_rows.values()]
    stitched = 0
    for (*_, kind), parts in chunks.items():
        parts.sort(key=lambda x: x[0])
        first = parts[0][2]
        gap = None
        if kind == "tokens":
            gap = next((f"rows from position {s} follow position {ps + pn - 1}" for (ps, pn, _), (s, _, _)
                        in zip(parts, parts[1:]) if s != ps + pn), None)
            if parts[0][0] != 0:
                gap = f"the prompt's rows start at position {parts[0][0]}"
        if len(parts) == 1 and gap is None:
            out.append(replace(first, phase="prefill", step=0))
            continue
        stitched += len(parts) > 1
        recs = tuple(r for _, _, q in parts for r in q.recs)
        out.append(Stitched(first.key, "prefill", 0, first.call, first.seq, first.rank, recs, first.shard_dim,
                            error=gap and f"prefill chunks are not contiguous: {gap}", note=first.note,
                            reduce=first.reduce, parts=tuple(q for _, _, q in parts)))
    return out, stitched


def take(t: torch.Tensor, row: int | None, span: tuple[int, int] | None) -> torch.Tensor:
    """The part of a record's tensor that one sequence owns: its batch row,
    then its token span (ragged rows, or the unpadded tokens of a row)."""
    if row is not None:
        t = t[row]
    if span is not None:
        t = t[span[0]:span[1]]
    return t


def squeeze_leading(t: torch.Tensor) -> torch.Tensor:
    while t.dim() > 1 and t.shape[0] == 1:
        t = t[0]
    return t


def _per_token(rec: Record) -> bool:
    """A ragged record with one row per token of its forward: dim 0 is where
    ``cu_seqlens`` ends, or that plus the rows the run declares padding (a
    batch padded to a captured graph's size), which are never compared."""
    cu, pad = rec.cu_seqlens, rec.meta.get("pad_rows", 0)
    dim0 = rec.shape[0] if rec.shape else None
    return cu is not None and (dim0 == cu[-1] or bool(pad) and dim0 == cu[-1] + pad)


def _cut(rec: Record) -> list[tuple[int | None, int | None, tuple[int, int] | None, str | None]]:
    """(seq_id, batch row, token span, error) for every sequence ``rec`` covers."""
    seq_ids = rec.seq_ids
    if not seq_ids:
        return [(None, None, None, None)]
    cu = rec.cu_seqlens
    dim0 = rec.shape[0] if rec.shape else None
    if cu is not None:
        if len(cu) != len(seq_ids) + 1:
            return [(s, None, None, f"cu_seqlens has {len(cu)} entries for {len(seq_ids)} sequences")
                    for s in seq_ids]
        if _per_token(rec):
            return [(s, None, (cu[i], cu[i + 1]), None) for i, s in enumerate(seq_ids)]
        if dim0 == len(seq_ids):
            # One row per sequence (e.g. last-token logits) in a ragged forward.
            return [(s, None, (i, i + 1), None) for i, s in enumerate(seq_ids)]
        return [(s, None, None, f"dim 0 is {dim0} but cu_seqlens ends at {cu[-1]}") for s in seq_ids]
    lens = rec.meta.get("seq_lens")
    if lens is not None and dim0 == len(seq_ids) and len(rec.shape) >= 2:
        # A padded [B, S, ...] batch: each row holds seq_lens[i] real tokens,
        # on the right (default) or the left of the padding.
        if len(lens) != len(seq_ids):
            return [(s, None, None, f"seq_lens has {len(lens)} entries for {len(seq_ids)} sequences")
                    for s in seq_ids]
        width = rec.shape[1]
        if max(lens) > width:
            return [(s, None, None, f"seq_lens reach {max(lens)} but dim 1 is {width}") for s in seq_ids]
        left = rec.meta.get("padding_side", "right") == "left"
        return [(s, i, (width - n, width) if left else (0, n), None) for i, (s, n) in enumerate(zip(seq_ids, lens))]
    if len(seq_ids) == 1:
        return [(seq_ids[0], None, None, None)]
    if dim0 == 1:
        # One row for the whole batch (rotary cos/sin of a padded batch,
        # [1, S, D]): shared by every sequence, compared once, as shared.
        return [(None, None, None, None)]
    if dim0 == len(seq_ids):
        return [(s, i, None, None) for i, s in enumerate(seq_ids)]
    return [(s, None, None, f"dim 0 is {dim0} but seq_ids lists {len(seq_ids)} sequences") for s in seq_ids]


@dataclass
class Side:
    """One dump cut into pieces, indexed by match key."""

    dump: Dump
    pieces: list[Piece] = field(default_factory=list)
    unmapped: int = 0               # records the mapping dropped
    notes: list[str] = field(default_factory=list)


def cut_dump(dump: Dump, mapping=None, *, keep=None, stages=None, side: str | None = None) -> Side:
    """Pieces of every record of ``dump``, as ``side`` ("ref" or "target": the
    mapping's rules for it apply too). ``keep(canonical_key) -> bool`` and
    ``stages`` (a set of record stages) select records before any tensor is read."""
    mapping = mapping if mapping is not None else resolve_mapping()
    side_name, side = side, Side(dump)
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for rec in dump.records():
        if rec.kind != "tensor" or (stages is not None and rec.stage not in stages):
            continue
        key = mapping.canonical(rec.key, side_name)
        if key is None:
            side.unmapped += 1
            continue
        if keep is not None and not keep(key):
            continue
        # The reference runs one sequence per forward, so (key, phase, step,
        # call) repeats once per sequence; shards of one forward share seq_ids.
        # (and one forward of a prompt split over several: its first positions)
        groups[(key, rec.phase, rec.step, rec.call, tuple(rec.seq_ids or ()),
                tuple(rec.meta.get("start_positions") or ()))].append(rec)
    partial = set()
    for (key, phase, step, call, _, _), recs in groups.items():
        recs.sort(key=lambda r: r.rank)
        ranks = [r.rank for r in recs]
        if len(set(ranks)) != len(ranks):
            raise ParityError(f"{dump.path}: record {key} ({phase} step {step} call {call}) appears twice "
                              f"on one rank; the dump mixes two runs")
        dims = {r.meta.get("shard_dim") for r in recs}
        reduces = {r.meta.get("shard_reduce") for r in recs}
        world = max(r.world_size for r in recs)
        reduce = None
        if len(recs) == 1:
            units, shard_dim, note = [(None, tuple(recs))], None, None
            if (dims != {None} or reduces != {None}) and world > 1:
                units = [(recs[0].rank, tuple(recs))]
                what = "partial sum" if reduces != {None} else "shard"
                note = f"{what} of rank {recs[0].rank} only; compared rank by rank"
                partial.add(key)
        elif reduces == {"sum"} and ranks == list(range(world)):
            units, shard_dim, note, reduce = [(None, tuple(recs))], None, f"partial sums of {world} ranks added", "sum"
        elif None not in dims and len(dims) == 1 and ranks == list(range(world)):
            units, shard_dim, note = [(None, tuple(recs))], dims.pop(), None
        else:
            units, shard_dim = [(r.rank, (r,)) for r in recs], None
            if reduces != {None}:
                note = f"partial sums of ranks {ranks} of {world}; compared rank by rank"
                partial.add(key)
            elif None in dims:
                note = "replicated on every rank (no shard_dim); compared rank by rank"
            else:
                note = f"shards of ranks {ranks} of {world}; compared rank by rank"
                partial.add(key)
        for rank, rs in units:
            for seq, row, span, err in _cut(rs[0]):
                side.pieces.append(Piece(key, phase, step, call, seq, rank, rs, shard_dim, row, span, err, note,
                                         reduce))
    padded = [r for rs in groups.values() for r in rs if r.meta.get("pad_rows")]
    if padded:
        side.notes.append(f"{dump.path}: {sum(r.meta['pad_rows'] for r in padded)} padding row(s) in "
                          f"{len(padded)} record(s), declared by the run (meta pad_rows), not compared")
    if partial:
        side.notes.append(f"{dump.path}: {len(partial)} sharded record(s) miss ranks and were compared rank "
                          f"by rank, e.g. {sorted(partial)[0]}")
    side.pieces, stitched = _by_position(side.pieces, dump)
    if stitched:
        side.notes.append(f"{dump.path}: {stitched} prompt piece(s) computed in several prefill chunks were "
                          "stitched back by position")
    side.pieces.sort(key=lambda p: p.order)
    return side


def shard_blame(piece: Piece, target: torch.Tensor, ref: torch.Tensor, fails) -> tuple[list[int], str] | None:
    """For a re-assembled shard piece that failed: the ranks whose own part
    of ``target`` is off against the same part of ``ref`` (reshaped to
    ``target``'s shape), by ``fails(part, ref_part) -> bool``, and a note
    saying so. None for anything but concatenated shards (a partial sum
    cannot be split back into its ranks)."""
    if piece.shard_dim is None or piece.reduce or len(piece.recs) < 2 or target.numel() != ref.numel():
        return None
    ndim = len(piece.rec.shape)
    d = piece.shard_dim - ndim if piece.shard_dim >= 0 else piece.shard_dim  # survives dropped leading dims
    if -d > target.dim():
        return None
    sizes = [r.shape[d] for r in piece.recs]
    if sum(sizes) != target.shape[d]:
        return None
    ref = ref.reshape(target.shape)
    parts = zip(piece.recs, target.split(sizes, dim=d), ref.split(sizes, dim=d))
    bad = [rec.rank for rec, a, b in parts if fails(a, b)]
    if not bad or len(bad) == len(sizes):
        return (bad, "the shards of every rank are off") if bad else None
    good = [r.rank for r in piece.recs if r.rank not in bad]
    ranks = lambda rs: ("rank " if len(rs) == 1 else "ranks ") + ", ".join(map(str, rs))  # noqa: E731
    return bad, f"{ranks(bad)}'s shard is off, {ranks(good)}'s agrees (split along dim {piece.shard_dim})"


@dataclass
class Pair:
    ref: Piece
    target: Piece

    @property
    def rank(self):
        return self.target.rank if self.target.rank is not None else self.ref.rank

    @property
    def note(self) -> str | None:
        return self.target.note or self.ref.note


@dataclass
class Alignment:
    pairs: list[Pair]               # in the target's execution order
    only_ref: list[Piece]
    only_target: list[Piece]
    notes: list[str]


def align(ref: Side, target: Side) -> Alignment:
    """Pair pieces on (canonical key, phase, step, call, seq_id); a per-rank
    piece on one side meets the whole piece of the other side."""
    by_match: dict[tuple, list[Piece]] = defaultdict(list)
    for p in ref.pieces:
        by_match[p.match].append(p)
    used: set[int] = set()
    pairs, only_target = [], []
    for t in target.pieces:
        cands = by_match.get(t.match, [])
        hit = [r for r in cands if r.rank == t.rank] or [r for r in cands if r.rank is None or t.rank is None]
        if not hit:
            only_target.append(t)
            continue
        for r in hit:
            used.add(id(r))
            pairs.append(Pair(r, t))
    only_ref = [p for p in ref.pieces if id(p) not in used]
    return Alignment(pairs, only_ref, only_target, ref.notes + target.notes)


def comparable(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """``a`` reshaped to ``b``'s shape when only the split of dims differs
    (``[S, H*D]`` vs ``[S, H, D]``). Different element counts raise: a
    truncated comparison would report agreement on data never compared."""
    if a.shape == b.shape:
        return a, b, None
    if a.numel() != b.numel():
        raise ShapeMismatch(f"shape mismatch: target {list(a.shape)} ({a.numel()} elements) vs "
                            f"reference {list(b.shape)} ({b.numel()} elements)")
    return a.reshape(b.shape), b, f"target {list(a.shape)} reshaped to {list(b.shape)}"


class ShapeMismatch(ValueError):
    pass


def release(dump: Dump, recs) -> None:
    """Drop the memory maps behind ``recs`` so their pages leave this
    process's resident set once no tensor views them."""
    shards = getattr(dump, "_shards", None)
    if not shards:
        return
    for rec in recs:
        if rec.file and rec.rank in dump.rank_dirs:
            shards.pop(os.path.join(dump.rank_dirs[rec.rank], rec.file), None)


class ShardReleaser:
    """Drops a shard's memory map once the last of the given record uses is
    done, so a long comparison keeps about one shard of each dump resident."""

    def __init__(self, dump: Dump, recs):
        self.dump = dump
        self.left = Counter((r.rank, r.file) for r in recs)

    def done(self, recs) -> None:
        for rec in recs:
            k = (rec.rank, rec.file)
            self.left[k] -= 1
            if self.left[k] <= 0:
                release(self.dump, [rec])


def token_ids(dump: Dump) -> list[list[int]] | None:
    """run.json ``token_ids`` as a list of sequences (a flat list is one)."""
    ids = dump.run.get("token_ids")
    if ids is None:
        return None
    if ids and all(isinstance(x, int) for x in ids):
        return [list(ids)]
    return [list(x) for x in ids]


def check_token_ids(ref: Dump, target: Dump) -> str | None:
    """Raise when both runs record token ids and they differ; return a note
    when the check could not be made."""
    a, b = token_ids(ref), token_ids(target)
    if a is None or b is None:
        missing = [n for n, x in (("reference", a), ("target", b)) if x is None]
        return f"token ids not checked: run.json of the {' and '.join(missing)} has no token_ids"
    if a == b:
        return None
    if len(a) != len(b):
        raise ParityError(f"the runs saw different inputs: reference has {len(a)} sequences, target {len(b)} "
                          f"(run.json token_ids); compare dumps of the same prompts")
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            j = next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            raise ParityError(f"the runs saw different inputs: sequence {i} differs at token {j} "
                              f"(reference {x[j] if j < len(x) else 'end'}, target {y[j] if j < len(y) else 'end'}; "
                              f"run.json token_ids); compare dumps of the same prompts")
    return None
