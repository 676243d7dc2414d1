import dataclasses
import errno
import os
import time

import pytest
import torch
from torch import nn

import parity
from parity import capture
from parity.capture.taps import state
from parity.config import CaptureConfig, parse_int_set
from parity.errors import ConfigError
from parity.store import open_dump


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        h = self.proj(self.norm(x))
        parity.tap(f"{self._name}.gate", h.sum(-1))
        return x + h


class Toy(nn.Module):
    def __init__(self, n=4, d=8):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        for i, b in enumerate(self.layers):
            b._name = f"model.layers.{i}"
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.head(x)


def _run(tmp_path, model=None, n_calls=1, **cfg):
    torch.manual_seed(0)
    model = model or Toy()
    x = torch.randn(2, 5, 8)
    h = capture.install(model, CaptureConfig(dump_dir=str(tmp_path / "d"), **cfg))
    outs = []
    for step in range(n_calls):
        h.set_context(phase="prefill" if step == 0 else "decode", step=step, seq_ids=[0, 1])
        outs.append(model(x))
    h.close()
    return open_dump(str(tmp_path / "d")), outs, model, x


def test_off_registers_nothing_and_writes_nothing(tmp_path, monkeypatch):
    for k in list(os.environ):
        if k.startswith("PARITY_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    model = Toy()
    h = capture.install(model)
    assert not h.enabled and h.hook_count == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert state.session is None
    model(torch.randn(1, 2, 8))
    parity.tap("x", torch.ones(1))
    h.set_context(phase="prefill", step=0)
    h.close()
    assert os.listdir(tmp_path) == []


def test_env_turns_capture_on(tmp_path, monkeypatch):
    monkeypatch.setenv("PARITY_DUMP_DIR", str(tmp_path / "e"))
    monkeypatch.setenv("PARITY_DUMP_CLASSES", "Linear")
    model = Toy()
    h = capture.install(model)
    model(torch.randn(1, 2, 8))
    h.close()
    keys = {r.key for r in open_dump(str(tmp_path / "e")).records()}
    assert "model.layers.0.gate:tap" in keys
    assert {k for k in keys if not k.endswith(":tap")} == {f"layers.{i}.proj:output" for i in range(4)} | {"head:output"}


def test_records_match_outputs_and_metadata(tmp_path):
    dump, outs, model, x = _run(tmp_path)
    recs = {r.key: r for r in dump.records()}
    assert torch.equal(dump.load(recs["head:output"]), outs[0])
    r = recs["layers.2:output"]
    assert r.layer == 2 and r.cls == "Block" and r.phase == "prefill" and r.step == 0
    assert r.meta["seq_ids"] == [0, 1]
    assert r.stats["nan"] == 0 and r.stats["absmax"] == pytest.approx(dump.load(r).abs().max().item())
    seqs = [rec.seq for rec in dump.records()]
    assert seqs == sorted(seqs)
    # execution order: layer 0 before layer 3, head last among module outputs
    order = [rec.key for rec in dump.records() if rec.stage == "output"]
    assert order.index("layers.0:output") < order.index("layers.3:output") < order.index("head:output")


def test_filters_by_class_path_layer_and_call(tmp_path):
    dump, *_ = _run(tmp_path / "a", classes=frozenset({"LayerNorm"}), stages=frozenset({"outputs"}))
    assert {r.key for r in dump.records()} == {f"layers.{i}.norm:output" for i in range(4)}
    import re
    dump, *_ = _run(tmp_path / "b", modules=re.compile(r"proj$"), layers=frozenset({1, 3}),
                    stages=frozenset({"outputs"}))
    assert {r.key for r in dump.records()} == {"layers.1.proj:output", "layers.3.proj:output"}


def test_calls_reset_per_context_and_filter(tmp_path):
    shared = nn.Linear(8, 8)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = shared

        def forward(self, x):
            return self.shared(self.shared(x))

    dump, *_ = _run(tmp_path / "a", model=Twice(), n_calls=2, calls=None, stages=frozenset({"outputs"}))
    got = sorted((r.step, r.call) for r in dump.records() if r.module == "shared")
    assert got == [(0, 0), (0, 1), (1, 0), (1, 1)]
    dump, *_ = _run(tmp_path / "b", model=Twice(), n_calls=2, calls=frozenset({1}), stages=frozenset({"outputs"}))
    assert sorted((r.step, r.call) for r in dump.records() if r.module == "shared") == [(0, 1), (1, 1)]


def test_inputs_are_recorded_before_in_place_mutation(tmp_path):
    class Mutates(nn.Module):
        def forward(self, x, scale=None):
            x.mul_(0)  # a module that reuses its input buffer
            return x + 1

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Mutates()

        def forward(self, x):
            y = self.inner(x, scale=torch.tensor(2.0))
            y.add_(100)  # mutation after the hook must not reach the record
            return y

    x = torch.arange(6.0)
    dump, *_ = _run(tmp_path, model=Outer(), stages=frozenset({"inputs", "outputs"}))
    recs = {r.key: r for r in dump.records()}
    # _run feeds torch.randn(2, 5, 8) under seed 0; the record must be that, not the zeroed buffer
    torch.manual_seed(0)
    assert torch.equal(dump.load(recs["inner:input.0"]), torch.randn(2, 5, 8))
    assert torch.equal(dump.load(recs["inner:output"]), torch.ones(2, 5, 8))
    assert torch.equal(dump.load(recs["inner:input.scale"]), torch.tensor(2.0))


@dataclasses.dataclass
class Out:
    hidden: torch.Tensor
    extra: tuple


def test_structured_outputs_become_stages(tmp_path):
    class Structured(nn.Module):
        def forward(self, x):
            return {"a": x * 2, "b": (x, None, 3)}, Out(hidden=x + 1, extra=(x - 1,))

    dump, *_ = _run(tmp_path, model=Structured(), stages=frozenset({"outputs"}))
    stages = {r.stage for r in dump.records()}
    assert stages == {"output.0.a", "output.0.b.0", "output.1.hidden", "output.1.extra.0"}


def test_stats_mode_writes_no_tensor_bytes(tmp_path):
    dump, outs, *_ = _run(tmp_path, mode="stats")
    rank_dir = os.path.join(dump.path, "rank0")
    assert not [f for f in os.listdir(rank_dir) if f.endswith(".safetensors")]
    r = next(r for r in dump.records() if r.key == "head:output")
    assert r.kind == "stats" and r.shape == [2, 5, 3]
    assert r.stats["absmax"] == pytest.approx(outs[0].abs().max().item(), rel=1e-6)
    assert r.stats["std"] == pytest.approx(outs[0].double().std(unbiased=False).item(), rel=1e-5)


def test_sample_mode_keeps_first_and_last_tokens(tmp_path):
    class Ident(nn.Module):
        def forward(self, x):
            return x * 1

    model = Ident()
    h = capture.install(model, CaptureConfig(dump_dir=str(tmp_path / "d"), mode="sample", sample_tokens=2))
    x = torch.arange(20.0).reshape(20, 1)
    h.set_context(phase="prefill", step=0, seq_ids=[0, 1], cu_seqlens=[0, 7, 20])
    model(x)
    h.close()
    dump = open_dump(str(tmp_path / "d"))
    r = dump.records()[0]
    assert dump.load(r).flatten().tolist() == [0, 1, 5, 6, 7, 8, 18, 19]
    assert r.meta["cu_seqlens"] == [0, 4, 8] and r.meta["sample"]["orig_cu_seqlens"] == [0, 7, 20]


def test_disk_full_keeps_model_running_and_turns_capture_off(tmp_path, monkeypatch, capsys):
    from parity.store import writer as writer_mod

    def boom(self, items):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_mod.DumpWriter, "_write_shard", boom)
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(2, 5, 8)
    ref = model(x)
    h = capture.install(model, CaptureConfig(dump_dir=str(tmp_path / "d")))
    outs = [model(x) for _ in range(3)]
    h.flush()
    assert not h.enabled and h.errors >= 1
    outs.append(model(x))
    h.close()
    for o in outs:
        assert torch.equal(o, ref)
    err = capsys.readouterr().err
    assert err.count("capture failed") == 1 and "No space left" in err
    assert state.session is None


def test_records_reach_the_disk_in_groups_without_flush(tmp_path):
    """Group commit: a stream of records costs one shard and one manifest
    fsync per group, yet nothing waits for close() to become durable."""
    from parity.capture import session as session_mod
    from parity.store import writer as writer_mod

    shards = []
    real = writer_mod.DumpWriter._write_shard
    model = Toy()
    x = torch.randn(2, 5, 8)
    h = capture.install(model, CaptureConfig(dump_dir=str(tmp_path / "d"), classes=frozenset({"Block"}), calls=None))
    h._session.writer._write_shard = lambda items: (shards.append(len(items)), real(h._session.writer, items))
    for step in range(5):
        h.set_context(step=step)
        model(x)
    deadline = time.monotonic() + 20 * session_mod._MAX_DELAY_S
    while len(open_dump(str(tmp_path / "d")).records()) < 40 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(open_dump(str(tmp_path / "d")).records()) == 40  # 4 blocks + 4 taps, 5 forwards
    assert sum(shards) == 40 and len(shards) < 40
    h.close()


def test_records_made_during_cuda_graph_capture_are_skipped_once_said(tmp_path, monkeypatch, capsys):
    from parity.capture import session as session_mod

    in_graph = [True]
    monkeypatch.setattr(session_mod, "_capturing_graph", lambda t: in_graph[0])
    model = Toy()
    x = torch.randn(2, 5, 8)
    ref = model(x)
    h = capture.install(model, CaptureConfig(dump_dir=str(tmp_path / "d"), calls=None))
    assert torch.equal(model(x), ref) and torch.equal(model(x), ref)   # "inside a graph capture"
    in_graph[0] = False
    h.set_context(step=1)
    assert torch.equal(model(x), ref)                                    # eager again
    assert h.enabled
    h.close()
    err = capsys.readouterr().err
    assert err.count("while a CUDA graph was being captured") == 1 and "eager" in err
    recs = open_dump(str(tmp_path / "d")).records()
    # one eager forward: every module (4 x norm, proj, block; the head; the model) and 4 taps
    assert len(recs) == 18 and {r.step for r in recs} == {1}


def test_hook_exception_never_reaches_host(tmp_path, monkeypatch, capsys):
    from parity.capture import session as session_mod

    def bad_record(*a, **k):
        raise TypeError("cannot serialise this")

    monkeypatch.setattr(session_mod.CaptureSession, "record", bad_record)
    model = Toy()
    x = torch.randn(1, 2, 8)
    ref = model(x)
    h = capture.install(model, CaptureConfig(dump_dir=str(tmp_path / "d")))
    assert torch.equal(model(x), ref) and torch.equal(model(x), ref)
    h.close()
    assert capsys.readouterr().err.count("capture failed") == 1


def test_byte_budget_stops_capture_once(tmp_path, capsys):
    dump, outs, *_ = _run(tmp_path, max_bytes=2 * 5 * 8 * 4 * 3 + 10, stages=frozenset({"outputs"}))
    assert 1 <= len(dump.records()) <= 3
    assert capsys.readouterr().err.count("capture stopped") == 1


def test_weight_dump(tmp_path):
    model = Toy()
    n = capture.dump_weights(model, str(tmp_path / "w"), layers=frozenset({1}))
    dump = open_dump(str(tmp_path / "w"))
    names = {r.module for r in dump.records()}
    assert n == len(names)
    assert "layers.1.proj.weight" in names and "layers.0.proj.weight" not in names and "head.weight" in names
    rec = next(r for r in dump.records() if r.module == "layers.1.proj.weight")
    assert torch.equal(dump.load(rec), model.layers[1].proj.weight.detach())


def test_weight_dump_env_and_exit(tmp_path, monkeypatch):
    monkeypatch.setenv("PARITY_WEIGHT_DUMP_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("PARITY_WEIGHT_DUMP_EXIT", "1")
    with pytest.raises(SystemExit) as ex:
        capture.install(Toy())
    assert ex.value.code == 0
    assert len(open_dump(str(tmp_path / "w")).records()) > 0


def test_bad_env_is_reported_not_raised(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PARITY_DUMP_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("PARITY_DUMP_LAYERS", "1-x")
    h = capture.install(Toy())
    assert not h.enabled and "PARITY_DUMP_LAYERS" in capsys.readouterr().err


def test_existing_dump_dir_is_not_mixed(tmp_path, capsys):
    _run(tmp_path)
    h = capture.install(Toy(), CaptureConfig(dump_dir=str(tmp_path / "d")))
    assert not h.enabled
    assert "already holds a run" in capsys.readouterr().err


def test_parse_int_set():
    assert parse_int_set("0-3,10", "X") == {0, 1, 2, 3, 10}
    assert parse_int_set("all", "X") is None
    with pytest.raises(ConfigError):
        parse_int_set("3-1", "X")


def test_capture_on_tiny_transformers_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 7))
    h = capture.install(model, CaptureConfig(dump_dir=str(tmp_path / "d"),
                                             classes=frozenset({"LlamaDecoderLayer", "LlamaRMSNorm"})))
    h.set_context(phase="prefill", step=0, seq_ids=[0])
    with torch.no_grad():
        out = model(ids)
    h.set_run_info(token_ids=ids.tolist())
    h.close()
    dump = open_dump(str(tmp_path / "d"))
    layers = {r.layer for r in dump.records() if r.cls == "LlamaDecoderLayer"}
    assert layers == {0, 1}
    assert dump.run["token_ids"] == ids.tolist() and dump.run["model"] == "LlamaForCausalLM"
    final = next(r for r in dump.records() if r.module == "model.norm")
    assert torch.allclose(model.lm_head(dump.load(final)), out.logits, atol=1e-6)
