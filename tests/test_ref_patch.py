import math

import pytest
import torch
from torch import nn

from parity import ref_patch
from parity.config import CaptureConfig
from parity.store import open_dump


class Scorer(nn.Module):
    def forward(self, x):
        return x.topk(2, dim=-1).indices

    def helper(self, x):
        return x * 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Scorer(), Scorer()])
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return [layer(self.lin(x)) for layer in self.layers]


def test_patch_method_restores_on_exception():
    orig = Scorer.helper
    s = Scorer()
    with pytest.raises(RuntimeError):
        with ref_patch.patch_method(Scorer, "helper", lambda f, self, x: f(self, x) + 1):
            assert s.helper(torch.tensor(1.0)) == 3
            raise RuntimeError("boom")
    assert Scorer.helper is orig and s.helper(torch.tensor(1.0)) == 2


def test_patch_method_on_instance_and_inherited_attribute():
    class Child(Scorer):
        pass

    c = Child()
    with ref_patch.patch_method(Child, "helper", lambda f, self, x: -f(self, x)):
        assert c.helper(torch.tensor(1.0)) == -2
        assert Scorer().helper(torch.tensor(1.0)) == 2  # the parent class is untouched
    assert "helper" not in Child.__dict__  # override removed, inheritance restored
    with ref_patch.patch_method(c, "helper", lambda f, x: f(x) * 10):
        assert c.helper(torch.tensor(1.0)) == 20
    assert "helper" not in c.__dict__ and c.helper(torch.tensor(1.0)) == 2


def test_nested_patches_unwind_in_order():
    with ref_patch.patch_method(Scorer, "helper", lambda f, self, x: f(self, x) + 1):
        with ref_patch.patch_method(Scorer, "helper", lambda f, self, x: f(self, x) * 10):
            assert Scorer().helper(torch.tensor(1.0)) == 30
        assert Scorer().helper(torch.tensor(1.0)) == 3
    assert Scorer().helper(torch.tensor(1.0)) == 2


def test_patch_function_by_module_and_path():
    with ref_patch.patch_function("math", "sqrt", lambda x: -1.0):
        assert math.sqrt(4) == -1.0
    assert math.sqrt(4) == 2.0
    with pytest.raises(AttributeError):
        with ref_patch.patch_function(math, "no_such_kernel", lambda: 0):
            pass


def test_tap_method_records_internal_results(tmp_path):
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 4)
    with ref_patch.patch_module_dump(net, CaptureConfig(dump_dir=str(tmp_path / "d"), stages=frozenset({"taps"}))), \
            ref_patch.module_paths(net, prefix="model"), \
            ref_patch.tap_method(Scorer, "forward", stage="topk"):
        out = net(x)
    assert not hasattr(net.layers[0], ref_patch.PATH_ATTR)
    assert "forward" not in Scorer.__dict__ or Scorer.forward.__name__ == "forward"
    dump = open_dump(str(tmp_path / "d"))
    recs = {r.key: r for r in dump.records()}
    assert set(recs) == {"model.layers.0.topk:tap", "model.layers.1.topk:tap"}
    assert torch.equal(dump.load(recs["model.layers.1.topk:tap"]), out[1])
    assert recs["model.layers.1.topk:tap"].layer == 1


def test_patch_module_dump_on_class(tmp_path):
    net = Net()
    with ref_patch.module_paths(net), \
            ref_patch.patch_module_dump(Scorer, CaptureConfig(dump_dir=str(tmp_path / "d"))):
        out = net(torch.randn(2, 4))
    recs = open_dump(str(tmp_path / "d")).records()
    assert [r.key for r in recs] == ["layers.0:output", "layers.1:output"]
    assert Scorer.forward is not None and "forward" in Scorer.__dict__
    assert torch.equal(open_dump(str(tmp_path / "d")).load(recs[1]), out[1])
