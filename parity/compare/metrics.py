"""Agreement metrics for one pair of tensors: target ``a`` against reference ``b``.

Every reduction runs in float64 over bounded blocks of the flattened tensors,
so the extra memory is a few blocks whatever the input size and memory-mapped
dumps of several GB stream through. Definitions, special cases and the
reasons behind them: docs/metrics.md.
"""

from __future__ import annotations

import math

import torch

from parity.errors import ParityError

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
    """Max ULP distance and count of distances > 1, block by block, in
    preallocated integer buffers (the ULP passes cost as much as all the
    float64 work together, so no allocation per block)."""

    def __init__(self, dtype: torch.dtype, blk: int, device):
        self.dtype = dtype
        self.it = _INT_OF_WIDTH[torch.finfo(dtype).bits // 8]
        self.nbits = torch.finfo(dtype).bits
        self.wide = _WIDER.get(self.it)
        if self.wide is not None:
            self.sign = torch.empty(2, blk, dtype=self.it, device=device)
            self.ord = torch.empty(2, blk, dtype=self.it, device=device)
            self.diff = torch.empty(blk, dtype=self.wide, device=device)
        self.max = self.gt1 = 0

    def update(self, ca: torch.Tensor, cb: torch.Tensor, bad):
        ra, rb = _round_to(ca, self.dtype), _round_to(cb, self.dtype)
        if self.wide is None:
            dist = _ulp_block(ra, rb)
        else:
            m = ra.numel()
            ia, ib = ra.view(self.it), rb.view(self.it)
            s, o, dist = self.sign[:, :m], self.ord[:, :m], self.diff[:m]
            # _ordered() for both rows, in place.
            torch.bitwise_right_shift(ia, self.nbits - 1, out=s[0])
            torch.bitwise_right_shift(ib, self.nbits - 1, out=s[1])
            torch.bitwise_and(s, (1 << (self.nbits - 1)) - 1, out=o)
            o[0].bitwise_xor_(ia)
            o[1].bitwise_xor_(ib)
            o.sub_(s)
            dist.copy_(o[0])
            dist.sub_(o[1])
            dist.abs_()
        if bad is not None:
            dist.masked_fill_(bad, 0)
        self.max = max(self.max, int(dist.max()))
        self.gt1 += int(torch.count_nonzero(dist >> 1))


class _FloatPair:
    """Running float64 sums over blocks; at least one side is floating point."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, blk: int):
        dev = a.device
        both_float = a.is_floating_point() and b.is_floating_point()
        self.ulp = _UlpStats(less_precise(a.dtype, b.dtype), blk, dev) if both_float else None
        # Bitwise equality only means something between identical dtypes.
        self.bits = _INT_OF_WIDTH[a.element_size()] if a.dtype == b.dtype else None
        if self.bits is not None:
            self.bitdiff = torch.empty(blk, dtype=self.bits, device=dev)
        self.buf = torch.empty(3, blk, dtype=torch.float64, device=dev)
        self.A = self.B = self.D = self.L1 = 0.0
        self.max_abs, self.max_at, self.ref_absmax = 0.0, None, 0.0
        self.n_cmp = self.n_equal = 0
        self.nan_a = self.nan_b = self.inf_a = self.inf_b = self.nonfinite_mismatch = 0

    def _dots(self, xa, xb, d):
        torch.sub(xa, xb, out=d)
        return torch.dot(xa, xa).item(), torch.dot(xb, xb).item(), torch.dot(d, d).item()

    def _nonfinite(self, xa, xb):
        m = xa.numel()
        fa, fb = torch.isfinite(xa), torch.isfinite(xb)
        na, nb = torch.isnan(xa), torch.isnan(xb)
        nan_a, nan_b = int(na.sum()), int(nb.sum())
        self.nan_a += nan_a
        self.nan_b += nan_b
        self.inf_a += m - int(fa.sum()) - nan_a
        self.inf_b += m - int(fb.sum()) - nan_b
        bad = ~(fa & fb)
        # Same non-finite value on both sides (NaN/NaN, +inf/+inf) agrees;
        # anything else at a non-finite position is a mismatch.
        same = (na & nb) | (bad & (xa == xb))
        n_bad, n_same = int(bad.sum()), int(same.sum())
        self.nonfinite_mismatch += n_bad - n_same
        return bad, n_bad, n_same

    def _ref_absmax(self, xb):
        lo, hi = torch.aminmax(xb)
        self.ref_absmax = max(self.ref_absmax, -lo.item(), hi.item())

    def _identical(self, m, cb) -> bool:
        # Bit-identical block (common when an engine reproduces the
        # reference exactly): one copy and one dot instead of the full pass.
        xb = self.buf[1, :m]
        xb.copy_(cb)
        B = torch.dot(xb, xb).item()
        if not math.isfinite(B):
            return False
        self.A += B
        self.B += B
        self.n_cmp += m
        self.n_equal += m
        self._ref_absmax(xb)
        return True

    def update(self, start: int, ca: torch.Tensor, cb: torch.Tensor):
        m = ca.numel()
        if self.bits is not None:
            # Wrapping integer difference is zero exactly when the bits match.
            bd = torch.sub(ca.view(self.bits), cb.view(self.bits), out=self.bitdiff[:m])
            n_eq = m - int(torch.count_nonzero(bd))
            if n_eq == m and self._identical(m, cb):
                return
        xa, xb, d = self.buf[0, :m], self.buf[1, :m], self.buf[2, :m]
        xa.copy_(ca)
        xb.copy_(cb)
        A, B, D = self._dots(xa, xb, d)
        bad, n_bad, n_same = None, 0, 0
        # Finite sums of squares prove every element finite: the common case
        # skips six mask passes.
        if not math.isfinite(A + B + D):
            bad, n_bad, n_same = self._nonfinite(xa, xb)
            if n_bad:
                xa.masked_fill_(bad, 0.0)
                xb.masked_fill_(bad, 0.0)
                A, B, D = self._dots(xa, xb, d)
            else:
                bad = None
        self.A += A
        self.B += B
        self.D += D
        self.n_cmp += m - n_bad
        if self.bits is None:
            n_eq = m - int(torch.count_nonzero(d)) - n_bad + n_same
        self.n_equal += n_eq

        lo, hi = torch.aminmax(d)
        cmax = max(-lo.item(), hi.item())
        d.abs_()
        self.L1 += d.sum().item()
        if cmax > self.max_abs:
            self.max_abs, self.max_at = cmax, start + int(torch.argmax(d))
        self._ref_absmax(xb)
        if self.ulp is not None:
            self.ulp.update(ca, cb, bad)

    def result(self) -> dict:
        A, B, D = self.A, self.B, self.D
        if B == 0.0:
            # B == 0 and D == 0 force A == 0: both sides are zero and agree.
            cos, rel, sqnr = (1.0, 0.0, math.inf) if D == 0.0 else (0.0, math.inf, -math.inf)
        else:
            rel = math.sqrt(D / B)
            sqnr = math.inf if D == 0.0 else 10.0 * math.log10(B / D)
            # a.b from the three sums already taken: saves a fourth pass.
            ab = 0.5 * (A + B - D)
            cos = 0.0 if A == 0.0 else max(-1.0, min(1.0, ab / math.sqrt(A * B)))
        n, u = self.n_cmp, self.ulp
        return {
            "cos": cos,
            "rel_l2": rel,
            "sqnr_db": sqnr,
            "max_abs": self.max_abs,
            "max_abs_index": self.max_at,
            "mean_abs": self.L1 / n if n else 0.0,
            "ref_absmax": self.ref_absmax,
            "n_equal": self.n_equal,
            "max_ulp": u.max if u else None,
            "frac_ulp_gt1": (u.gt1 / n if n else 0.0) if u else None,
            "ulp_dtype": _name(u.dtype) if u else None,
            "nan_a": self.nan_a,
            "nan_b": self.nan_b,
            "inf_a": self.inf_a,
            "inf_b": self.inf_b,
            "nonfinite_mismatch": self.nonfinite_mismatch,
            "n_compared": n,
        }


class _IntPair:
    """Integer tensors (top-k ids, masks): exact equality and distances."""

    def __init__(self, a, b, blk):
        self.L1 = 0
        self.max_abs, self.max_at, self.ref_absmax = 0, None, 0
        self.n = self.n_equal = 0

    def update(self, start, ca, cb):
        xa, xb = ca.to(torch.int64), cb.to(torch.int64)
        d = (xa - xb).abs_()
        self.n += d.numel()
        self.n_equal += d.numel() - int(torch.count_nonzero(d))
        cmax = int(d.max())
        if cmax > self.max_abs:
            self.max_abs, self.max_at = cmax, start + int(torch.argmax(d))
        self.L1 += int(d.sum())
        self.ref_absmax = max(self.ref_absmax, int(xb.abs().max()))

    def result(self) -> dict:
        return {
            "cos": None, "rel_l2": None, "sqnr_db": None,
            "max_abs": float(self.max_abs),
            "max_abs_index": self.max_at,
            "mean_abs": self.L1 / self.n if self.n else 0.0,
            "ref_absmax": float(self.ref_absmax),
            "n_equal": self.n_equal,
            "max_ulp": None, "frac_ulp_gt1": None, "ulp_dtype": None,
            "nan_a": 0, "nan_b": 0, "inf_a": 0, "inf_b": 0, "nonfinite_mismatch": 0,
            "n_compared": self.n,
        }


def pair_metrics(a: torch.Tensor, b: torch.Tensor, *, chunk_elems: int = 1 << 22) -> dict:
    """Metrics of target `a` against reference `b` (see docs/metrics.md).

    Shapes that differ give ``{"shape_mismatch": True, "shape_a", "shape_b",
    ...}`` and nothing else: no truncation, the caller decides."""
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
    acc = (_FloatPair if floating else _IntPair)(a, b, blk)
    for start, (ca, cb) in _blocks((a, b), chunk_elems):
        acc.update(start, ca, cb)
    out = {"shape_mismatch": False, "shape": tuple(a.shape), "numel": numel, **head, **acc.result()}
    if out["max_abs_index"] is not None:
        out["max_abs_index"] = _unravel(out["max_abs_index"], a.shape)
    out["frac_equal"] = out.pop("n_equal") / numel if numel else 1.0
    return out


# ---------------------------------------------------------------- one tensor

def summary_stats(t: torch.Tensor) -> dict:
    """absmax, mean, std (population), l2 over finite elements in float64,
    plus nan and inf counts. No finite element: zeros and the counts."""
    t = t.detach()
    if t.is_complex():
        raise ParityError("summary_stats: complex tensors are not supported")
    n = 0
    mean = m2 = l2sq = absmax = 0.0
    nan = inf = 0
    buf = torch.empty(max(1, min(t.numel(), _BLOCK)), dtype=torch.float64, device=t.device)
    for _, (c,) in _blocks((t,), 1 << 22):
        x = buf[:c.numel()].copy_(c)
        ss = torch.dot(x, x).item()
        if not math.isfinite(ss):
            fin = torch.isfinite(x)
            n_nan = int(torch.isnan(x).sum())
            nan += n_nan
            inf += x.numel() - int(fin.sum()) - n_nan
            x = x[fin]
            ss = torch.dot(x, x).item() if x.numel() else 0.0
        k = x.numel()
        if k == 0:
            continue
        lo, hi = torch.aminmax(x)
        absmax = max(absmax, -lo.item(), hi.item())
        l2sq += ss
        # Chan's pairwise merge of (count, mean, M2): no sumsq - n*mean^2
        # cancellation when |mean| >> std.
        mb = x.sum().item() / k
        x = x - mb
        m2b = torch.dot(x, x).item()
        delta, tot = mb - mean, n + k
        mean += delta * k / tot
        m2 += m2b + delta * delta * n * k / tot
        n = tot
    return {"absmax": absmax, "mean": mean, "std": math.sqrt(m2 / n) if n else 0.0,
            "l2": math.sqrt(l2sq), "nan": nan, "inf": inf}
