"""The noise model (parity/noise): perturbed ensembles, envelopes, and the
verdicts that score a pair against its record's envelope."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dumpgen import _record
from parity import compare_dumps, layer_bisect
from parity.compare.verdict import NOISE_FAIL, noise_flip_verdict, noise_verdict
from parity.errors import ParityError
from parity.noise import noise_model, perturbed
from parity.store import DumpWriter


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.lin = nn.Linear(64, 64)
        self.act = nn.GELU()

    def forward(self, ids):
        h = self.act(self.lin(self.emb(ids)))
        return h, ids.clone()


def _bits(t):
    return t.view(torch.int32).long()


def test_perturbed_moves_a_share_of_elements_by_one_ulp_and_leaves_the_rest():
    torch.manual_seed(0)
    net = _Net()
    ids = torch.randint(0, 50, (400,))
    clean, clean_ids = net(ids)
    with perturbed(net, seed=1, rate=0.1):
        noisy, noisy_ids = net(ids)
        again, _ = net(ids)
    changed = clean != noisy
    # the GELU's input moved too, so its output differs in more places than its own draws; each op moves by 1 ulp
    assert 0.1 < changed.float().mean() < 0.3
    assert torch.equal(noisy_ids, clean_ids)
    with perturbed(net, seed=1, rate=0.1):
        assert torch.equal(net(ids)[0], noisy)  # a member is reproducible from its seed
    assert not torch.equal(again, noisy)  # ... and each call draws anew
    assert torch.equal(net(ids)[0], clean)  # the hooks are gone
    with perturbed(net, seed=1, rate=0.1):
        emb = net.emb(ids)
    assert torch.equal(emb, net.emb(ids))  # lookups are exact anywhere: untouched
    with perturbed(net.lin, seed=2, rate=0.5):
        x = torch.randn(300, 64)
        ref = nn.functional.linear(x, net.lin.weight, net.lin.bias)
        out = net.lin(x)
    assert set((_bits(out) - _bits(ref)).unique().tolist()) <= {-1, 0, 1}
    with pytest.raises(ParityError, match="probability"):
        with perturbed(net, seed=0, rate=2.0):
            pass


def _dump(path, tensors: dict, ids=None):
    w = DumpWriter(str(path), run_info={"precision": "fp32"})
    items = [_record(w, "m", name, None, "prefill", 0, {}, t) for name, t in tensors.items()]
    if ids is not None:
        items.append(_record(w, "m.topk_ids", "tap", None, "prefill", 0, {}, ids))
    w.write_batch(items)
    w.close()
    return path


def test_pairs_are_judged_against_their_records_envelope(tmp_path):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, generator=g), torch.randn(500, generator=g)
    ids = torch.randint(0, 16, (100, 2), generator=g)

    def noisy(x, size, seed):
        return x * (1 + size * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)))

    def flipped(n):
        out = ids.clone()
        out[:n, 0] = (out[:n, 0] + 1) % 16
        return out

    ref = _dump(tmp_path / "ref", {"output": a, "output2": b}, ids)
    # the ensemble: record "output" is noisy at 1e-3, "output2" at 1e-6; 3 of 100 tokens flip
    members = [_dump(tmp_path / f"n{k}", {"output": noisy(a, 1e-3, k), "output2": noisy(b, 1e-6, k)}, flipped(3))
               for k in range(3)]
    nm = noise_model(ref, members)
    assert len(nm) == 3 and nm.envelope(("m:output", "prefill", 0, None, None)) > 5e-4
    ok = _dump(tmp_path / "ok", {"output": noisy(a, 1e-3, 9), "output2": noisy(b, 1e-6, 9)}, flipped(2))
    res = compare_dumps(ref, ok, noise=nm)
    assert not res.failed and set(res.table["verdict"]) <= {"pass", "warn"}
    assert all("noise, 3 members" in r for r in res.table["reason"])
    # 1e-4 on the quiet record is far beyond its envelope, within the loud one's
    bad = _dump(tmp_path / "bad", {"output": noisy(a, 1e-4, 9), "output2": noisy(b, 1e-4, 9)}, flipped(40))
    res = compare_dumps(ref, bad, noise=[str(m) for m in members])
    v = dict(zip(res.table["key"], res.table["verdict"]))
    assert v == {"m:output": "pass", "m:output2": "fail", "m.topk_ids:tap": "fail"}
    assert layer_bisect(ref, bad, noise=nm).exit_code == 1
    # the same target under fixed thresholds: the quiet record's 1e-4 only warns (fp32: warn 1e-5, fail 1e-4)
    assert not compare_dumps(ref, bad).table.set_index("key").loc["m:output2", "verdict"] == "pass"
    with pytest.raises(ParityError, match="at least one"):
        noise_model(ref, [])


def test_noise_verdict_rules():
    assert noise_verdict(1e-3, 1e-3, torch.float32, 4).status == "pass"
    assert noise_verdict(1.5e-3, 1e-3, torch.float32, 4).status == "warn"  # suspect
    assert noise_verdict((NOISE_FAIL + 0.5) * 1e-3, 1e-3, torch.float32, 4).status == "fail"
    # an exactly reproduced record: only its own last rounding is allowed
    assert noise_verdict(2.0 ** -21, 0.0, torch.float32, 4).status == "pass"
    assert noise_verdict(1e-5, 0.0, torch.float32, 4).status == "fail"
    assert noise_verdict(float("nan"), 1e-3, torch.float32, 4).status == "fail"
    assert noise_flip_verdict(0.0, 0.0, 4).status == "pass"
    assert noise_flip_verdict(0.02, 0.03, 4).status == "warn"
    assert noise_flip_verdict(0.2, 0.03, 4).status == "fail"
    with pytest.raises(ParityError):
        noise_verdict(0.1, 0.1, torch.int64, 4)


def test_an_error_every_token_carries_is_not_hidden_by_a_few_flipped_tokens(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 32, generator=g)

    def few_tokens_off(seed):  # a member whose routing flipped for 2 tokens: large there, zero elsewhere
        y = x.clone()
        rows = torch.randperm(40, generator=torch.Generator().manual_seed(seed))[:2]
        y[rows] = torch.randn(2, 32, generator=g)
        return y

    ref = _dump(tmp_path / "ref", {"output": x})
    members = [_dump(tmp_path / f"n{k}", {"output": few_tokens_off(k)}) for k in range(3)]
    nm = noise_model(ref, members)
    uniform = _dump(tmp_path / "uniform", {"output": x * 1.05})  # rel_l2 5e-2, well inside the record's envelope
    res = compare_dumps(ref, uniform, noise=nm)
    row = res.table.iloc[0]
    assert row["rel_l2"] < row["noise_env"] and row["verdict"] == "fail"
    assert row["reason"].startswith("median per-token error 5.0e-02")
    flipped = _dump(tmp_path / "flipped", {"output": few_tokens_off(7)})
    assert not compare_dumps(ref, flipped, noise=nm).failed
