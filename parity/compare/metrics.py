"""Agreement metrics for one pair of tensors: target ``a`` against reference ``b``.

Every reduction runs in float64 over bounded blocks of the flattened tensors,
so the extra memory is a few blocks whatever the input size and memory-mapped
dumps of several GB stream through. Definitions, special cases and the
reasons behind them: docs/metrics.md.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from parity.errors import ParityError
from parity.store.stats import block_moments

# Arithmetic runs on blocks of this many elements: three float64 rows (6 MiB)
# stay in L3 while a dozen passes go over them; larger blocks fall out to DRAM
# and every pass pays for it.
_BLOCK = 1 << 18

_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_WIDER = {torch.int8: torch.int16, torch.int16: torch.int32, torch.int32: torch.int64}
_I64_MAX = (1 << 63) - 1


def _name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def less_precise(da: torch.dtype, db: torch.dtype) -> torch.dtype:
    """The float dtype with the larger epsilon (bf16 over fp16 over fp32)."""
    return da if torch.finfo(da).eps >= torch.finfo(db).eps else db


# ---------------------------------------------------------------- iteration

def _pieces(shape: tuple, limit: int, prefix: tuple = ()):
    """Index tuples that cut a tensor of `shape` into row-major pieces of at
    most `limit` elements (a single innermost row is cut along its last dim)."""
    if not shape:
        yield prefix
        return
    inner = math.prod(shape[1:])
    if inner <= limit:
        step = max(1, limit // max(inner, 1))
        for i in range(0, shape[0], step):
            yield prefix + (slice(i, i + step),)
    else:
        for i in range(shape[0]):
            yield from _pieces(shape[1:], limit, prefix + (i,))


def _blocks(tensors, chunk_elems: int):
    """(flat start, [flat contiguous block per tensor]) in row-major order.

    Contiguous inputs are sliced in place (no copy, mmap pages are read once).
    Non-contiguous inputs are gathered `chunk_elems` at a time, so even then
    the copy is bounded."""
    step = max(1, int(chunk_elems))
    blk = min(step, _BLOCK)
    if all(t.is_contiguous() for t in tensors):
        chunks = (
            (s, [t.reshape(-1)[s:s + step] for t in tensors])
            for s in range(0, tensors[0].numel(), step)
        )
    else:
        def gathered():
            s = 0
            for idx in _pieces(tuple(tensors[0].shape), step):
                cs = [t[idx].reshape(-1) for t in tensors]
                yield s, cs
                s += cs[0].numel()
        chunks = gathered()
    for start, cs in chunks:
        for s in range(0, cs[0].numel(), blk):
            yield start + s, [c[s:s + blk] for c in cs]


def _count_nonzero(t: torch.Tensor) -> int:
    # numpy's count is ~5x faster than torch's on CPU integer tensors, and
    # it is one of the largest passes per block.
    if t.device.type == "cpu":
        return int(np.count_nonzero(t.numpy()))
    return int(torch.count_nonzero(t))


def _unravel(flat: int, shape) -> tuple:
    out = []
    for n in reversed(tuple(shape)):
        flat, r = divmod(flat, n)
        out.append(r)
    return tuple(reversed(out))


# ---------------------------------------------------------------- ULPs

def _ordered(bits: torch.Tensor) -> torch.Tensor:
    # Sign-magnitude float bits -> two's complement integers whose order is
    # the float order, +0 and -0 both at 0: neighbours differ by exactly one.
    nbits = bits.element_size() * 8
    m = bits >> (nbits - 1)
    return (bits ^ (m & ((1 << (nbits - 1)) - 1))) - m


def _ulp_block(ra: torch.Tensor, rb: torch.Tensor) -> torch.Tensor:
    it = _INT_OF_WIDTH[ra.element_size()]
    oa, ob = _ordered(ra.view(it)), _ordered(rb.view(it))
    if it is not torch.int64:
        w = _WIDER[it]
        return (oa.to(w) - ob.to(w)).abs_()
    # int64 has no wider type: opposite signs may pass 2**63, so saturate.
    dist = (oa - ob).abs_()
    opp = (oa ^ ob) < 0
    if bool(opp.any()):
        s = oa.abs() + ob.abs()
        s.masked_fill_(s < 0, _I64_MAX)
        dist = torch.where(opp, s, dist)
    return dist


def _round_to(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return (t if t.dtype == dt else t.to(dt)).contiguous()


def ulp_distance(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Elementwise ULP distance (int64) after rounding both to `dtype`
    (default: the less precise of the two). -1 where either side is not
    finite. Materialises the full result: for inspection of small tensors;
    pair_metrics does the same block by block."""
    if a.shape != b.shape:
        raise ParityError(f"ulp_distance: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise ParityError("ulp_distance: both tensors must be floating point")
    dt = dtype or less_precise(a.dtype, b.dtype)
    ra, rb = _round_to(a.detach(), dt), _round_to(b.detach(), dt)
    dist = _ulp_block(ra.reshape(-1), rb.reshape(-1)).to(torch.int64).reshape(a.shape)
    bad = ~(torch.isfinite(a) & torch.isfinite(b))
    return dist.masked_fill_(bad, -1)


# ---------------------------------------------------------------- pair metrics

class _UlpStats:
    """ULP distances of one block in preallocated integer buffers: the ULP
    passes cost about as much as the float work, so no allocation and no
    mixed-dtype op per block."""

    def __init__(self, dtype: torch.dtype, blk: int, device):
        self.dtype = dtype
        self.it = _INT_OF_WIDTH[torch.finfo(dtype).bits // 8]
        self.nbits = torch.finfo(dtype).bits
        self.wide = _WIDER.get(self.it)
        if self.wide is not None:
            self.sign = torch.empty(2, blk, dtype=self.it, device=device)
            self.ord = torch.empty(2, blk, dtype=self.it, device=device)
            self.ord_w = torch.empty(2, blk, dtype=self.wide, device=device)
            self.diff = torch.empty(blk, dtype=self.wide, device=device)

    def __call__(self, st: "_Stats", ca, cb, bad, want_ref_absmax: bool, narrow: bool):
        """narrow: every opposite-sign pair is below 1.0 in magnitude (known
        from max |a - b| < 1, since |a - b| = |a| + |b| across zero); then
        |o_a| + |o_b| < 2^(bits-1) and the distance fits the bits' own
        integer type, which saves the widening passes."""
        ra, rb = _round_to(ca, self.dtype), _round_to(cb, self.dtype)
        if self.wide is None:
            dist = _ulp_block(ra, rb)
        else:
            m = ra.numel()
            ia, ib = ra.view(self.it), rb.view(self.it)
            s, o, ow, dist = self.sign[:, :m], self.ord[:, :m], self.ord_w[:, :m], self.diff[:m]
            # _ordered() on both rows, in place.
            torch.bitwise_right_shift(ia, self.nbits - 1, out=s[0])
            torch.bitwise_right_shift(ib, self.nbits - 1, out=s[1])
            torch.bitwise_and(s, (1 << (self.nbits - 1)) - 1, out=o)
            o[0].bitwise_xor_(ia)
            o[1].bitwise_xor_(ib)
            o.sub_(s)
            if want_ref_absmax:
                # The order of the integers is the order of |b|: max |b| for
                # the price of an int16 pass instead of a float one.
                lo, hi = torch.aminmax(o[1])
                mag = max(-int(lo), int(hi))
                st.ref_absmax = torch.tensor([mag], dtype=self.it).view(self.dtype).item()
            if narrow:
                dist = torch.sub(o[0], o[1], out=s[0])
            else:
                ow.copy_(o)
                torch.sub(ow[0], ow[1], out=dist)
        if bad is not None:
            dist.masked_fill_(bad, 0)
        lo, hi = torch.aminmax(dist)
        st.max_ulp = max(-int(lo), int(hi))
        dist.abs_()
        dist.bitwise_right_shift_(1)
        st.ulp_gt1 = _count_nonzero(dist)


class _Stats:
    """Partial results of one block; merged in block order at the end so the
    float64 sums do not depend on thread scheduling."""

    __slots__ = ("A", "B", "D", "L1", "n_cmp", "n_equal", "max_abs", "max_at", "ref_absmax",
                 "nan_a", "nan_b", "inf_a", "inf_b", "mismatch", "max_ulp", "ulp_gt1")

    def __init__(self):
        for k in self.__slots__:
            setattr(self, k, 0)
        self.max_at = None


class _FloatKernel:
    """Metrics of one block; at least one side is floating point. One kernel
    per worker thread: it owns its buffers."""

    def __init__(self, da: torch.dtype, db: torch.dtype, blk: int, device):
        both_float = da.is_floating_point and db.is_floating_point
        self.ulp = _UlpStats(less_precise(da, db), blk, device) if both_float else None
        self.ulp_absmax = self.ulp is not None and self.ulp.wide is not None and db == self.ulp.dtype
        # Bitwise equality only means something between identical dtypes.
        self.bits = _INT_OF_WIDTH[torch.finfo(da).bits // 8] if da == db and both_float else None
        if self.bits is not None:
            self.bitdiff = torch.empty(blk, dtype=self.bits, device=device)
        self.f64 = torch.empty(3, blk, dtype=torch.float64, device=device)
        self.best = 0.0     # running max |a-b| of this worker: argmax only on a new max

    def _sums(self, xa, xb, d):
        torch.sub(xa, xb, out=d)
        return [torch.dot(xa, xa).item(), torch.dot(xb, xb).item(), torch.dot(d, d).item()]

    def _nonfinite(self, st, xa, xb):
        m = xa.numel()
        fa, fb = torch.isfinite(xa), torch.isfinite(xb)
        na, nb = torch.isnan(xa), torch.isnan(xb)
        st.nan_a, st.nan_b = int(na.sum()), int(nb.sum())
        st.inf_a = m - int(fa.sum()) - st.nan_a
        st.inf_b = m - int(fb.sum()) - st.nan_b
        bad = ~(fa & fb)
        # Same non-finite value on both sides (NaN/NaN, +inf/+inf) agrees;
        # anything else at a non-finite position is a mismatch.
        same = (na & nb) | (bad & (xa == xb))
        n_bad, n_same = int(bad.sum()), int(same.sum())
        st.mismatch = n_bad - n_same
        return bad, n_bad, n_same

    def __call__(self, start: int, ca: torch.Tensor, cb: torch.Tensor) -> _Stats:
        st, m = _Stats(), ca.numel()
        if self.bits is not None:
            # Wrapping integer difference is zero exactly when the bits match.
            bd = torch.sub(ca.view(self.bits), cb.view(self.bits), out=self.bitdiff[:m])
            st.n_equal = m - _count_nonzero(bd)
        xa, xb, d = self.f64[0, :m], self.f64[1, :m], self.f64[2, :m]
        xa.copy_(ca)
        xb.copy_(cb)
        sums = self._sums(xa, xb, d)
        bad, n_bad, n_same = None, 0, 0
        # Finite sums of squares prove every element finite: the common case
        # skips six mask passes.
        if not math.isfinite(sum(sums)):
            bad, n_bad, n_same = self._nonfinite(st, xa, xb)
            if n_bad:
                xa.masked_fill_(bad, 0.0)
                xb.masked_fill_(bad, 0.0)
                sums = self._sums(xa, xb, d)
            else:
                bad = None
        st.A, st.B, st.D = sums
        st.n_cmp = m - n_bad
        if self.bits is None:
            st.n_equal = m - _count_nonzero(d) - n_bad + n_same

        # A bit-identical block (an engine that reproduces the reference
        # exactly) has no difference and no ULPs to look at.
        identical = self.bits is not None and st.n_equal == m
        ulp_absmax = self.ulp_absmax and bad is None and not identical
        if not identical:
            lo, hi = torch.aminmax(d)
            st.max_abs = max(-lo.item(), hi.item())
            d.abs_()
            st.L1 = d.sum().item()
            if st.max_abs > 0.0 and st.max_abs >= self.best:
                self.best, st.max_at = st.max_abs, start + int(torch.argmax(d))
            if self.ulp is not None:
                self.ulp(st, ca, cb, bad, ulp_absmax, narrow=st.max_abs < 1.0)
        if not ulp_absmax:
            lo, hi = torch.aminmax(xb)
            st.ref_absmax = max(-lo.item(), hi.item())
        return st


class _IntKernel:
    """Integer tensors (top-k ids, masks): exact equality and distances."""

    def __init__(self, *_):
        self.best = 0

    def __call__(self, start, ca, cb) -> _Stats:
        st = _Stats()
        xa, xb = ca.to(torch.int64), cb.to(torch.int64)
        d = (xa - xb).abs_()
        st.n_cmp = d.numel()
        st.n_equal = d.numel() - _count_nonzero(d)
        st.max_abs = int(d.max())
        if st.max_abs and st.max_abs >= self.best:
            self.best, st.max_at = st.max_abs, start + int(torch.argmax(d))
        st.L1 = int(d.sum())
        st.ref_absmax = int(xb.abs().max())
        return st


def _run(make_kernel, blocks, n_blocks: int, threads: int) -> list:
    """Apply a kernel to every block, on `threads` workers that each run
    single-threaded torch ops on whole blocks. Splitting every small op over
    OpenMP threads instead costs a barrier per op, and on a loaded machine a
    preempted thread stalls them all (measured: about 8x slower on 2 busy cores)."""
    if threads <= 1 or n_blocks <= 1:
        k = make_kernel()
        return [k(start, *cs) for start, cs in blocks]
    it, lock, out, errors = enumerate(blocks), threading.Lock(), {}, []
    saved = torch.get_num_threads()

    def worker():
        try:
            # Per-thread in practice (OpenMP ICV, MKL local); the global
            # default is restored below.
            torch.set_num_threads(1)
            k = make_kernel()
            while True:
                with lock:
                    nxt = next(it, None)
                if nxt is None or errors:
                    return
                i, (start, cs) = nxt
                out[i] = k(start, *cs)
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(min(threads, n_blocks))]
    try:
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        torch.set_num_threads(saved)
    if errors:
        raise errors[0]
    return [out[i] for i in range(len(out))]


def _merge(parts: list, floating: bool, numel: int) -> dict:
    A = sum(p.A for p in parts)
    B = sum(p.B for p in parts)
    D = sum(p.D for p in parts)
    n = sum(p.n_cmp for p in parts)
    top = max((p for p in parts if p.max_at is not None), key=lambda p: (p.max_abs, -p.max_at), default=None)
    out = {
        "max_abs": float(top.max_abs) if top else 0.0,
        "max_abs_index": top.max_at if top else None,
        "mean_abs": sum(p.L1 for p in parts) / n if n else 0.0,
        "ref_absmax": float(max((p.ref_absmax for p in parts), default=0.0)),
        "frac_equal": sum(p.n_equal for p in parts) / numel if numel else 1.0,
        "n_compared": n,
    }
    if not floating:
        return out
    if B == 0.0:
        # B == 0 and D == 0 force A == 0: both sides are zero and agree.
        cos, rel, sqnr = (1.0, 0.0, math.inf) if D == 0.0 else (0.0, math.inf, -math.inf)
    else:
        rel = math.sqrt(D / B)
        sqnr = math.inf if D == 0.0 else 10.0 * math.log10(B / D)
        # a.b from the three sums already taken: saves a fourth pass.
        ab = 0.5 * (A + B - D)
        cos = 0.0 if A == 0.0 else max(-1.0, min(1.0, ab / math.sqrt(A * B)))
    out.update(cos=cos, rel_l2=rel, sqnr_db=sqnr)
    for k, f in (("nan_a", "nan_a"), ("nan_b", "nan_b"), ("inf_a", "inf_a"), ("inf_b", "inf_b"),
                 ("nonfinite_mismatch", "mismatch")):
        out[k] = sum(getattr(p, f) for p in parts)
    out["max_ulp"] = max((p.max_ulp for p in parts), default=0)
    out["frac_ulp_gt1"] = sum(p.ulp_gt1 for p in parts) / n if n else 0.0
    return out


def pair_metrics(a: torch.Tensor, b: torch.Tensor, *, chunk_elems: int = 1 << 22,
                 threads: int | None = None) -> dict:
    """Metrics of target `a` against reference `b` (see docs/metrics.md).

    Shapes that differ give ``{"shape_mismatch": True, "shape_a", "shape_b",
    ...}`` and nothing else: no truncation, the caller decides. `threads`
    defaults to torch.get_num_threads()."""
    a, b = a.detach(), b.detach()
    head = {"dtype_a": _name(a.dtype), "dtype_b": _name(b.dtype)}
    if a.shape != b.shape:
        return {"shape_mismatch": True, "shape_a": tuple(a.shape), "shape_b": tuple(b.shape),
                "numel_a": a.numel(), "numel_b": b.numel(), **head}
    if a.is_complex() or b.is_complex():
        raise ParityError("pair_metrics: complex tensors are not supported")
    numel = a.numel()
    blk = max(1, min(int(chunk_elems), _BLOCK, numel))
    floating = a.is_floating_point() or b.is_floating_point()
    kernel = _FloatKernel if floating else _IntKernel
    n_blocks = -(-numel // blk) if numel else 0
    threads = torch.get_num_threads() if threads is None else threads
    parts = _run(lambda: kernel(a.dtype, b.dtype, blk, a.device), _blocks((a, b), chunk_elems),
                 n_blocks, threads if a.device.type == "cpu" else 1)
    m = _merge(parts, floating, numel)
    if m["max_abs_index"] is not None:
        m["max_abs_index"] = _unravel(m["max_abs_index"], a.shape)
    both_float = a.is_floating_point() and b.is_floating_point()
    ulp_dt = _name(less_precise(a.dtype, b.dtype)) if both_float else None
    base = {"shape_mismatch": False, "shape": tuple(a.shape), "numel": numel, **head,
            "cos": None, "rel_l2": None, "sqnr_db": None}
    out = {**base, **m, "ulp_dtype": ulp_dt}
    if not both_float:
        out.update(max_ulp=None, frac_ulp_gt1=None)
    for k in ("nan_a", "nan_b", "inf_a", "inf_b", "nonfinite_mismatch"):
        out.setdefault(k, 0)
    return out


# ---------------------------------------------------------------- one tensor

def summary_stats(t: torch.Tensor) -> dict:
    """absmax, mean, std (population), l2 over finite elements in float64,
    plus nan and inf counts. No finite element: zeros and the counts."""
    t = t.detach()
    if t.is_complex():
        raise ParityError("summary_stats: complex tensors are not supported")
    absmax, n, mean, m2, l2sq, nan, inf = block_moments((c for _, (c,) in _blocks((t,), 1 << 22)), t.device)
    return {"absmax": absmax, "mean": mean, "std": math.sqrt(m2 / n) if n else 0.0,
            "l2": math.sqrt(l2sq), "nan": nan, "inf": inf}
