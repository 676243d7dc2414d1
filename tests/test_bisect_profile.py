"""layer-bisect without a noise model: the error profile is evidence.

A bf16 target of an fp32 residual stack carries bf16 rounding in every
layer, so a 5% weight error in one layer stays below the fixed fail limit;
what gives it away is how the error grows there against how the other
layers grow it. The clean bf16 target must not be called divergent."""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from parity import capture, layer_bisect
from parity.cli import cli
from parity.config import CaptureConfig

D = 64


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.up = nn.Linear(D, 2 * D)
        self.act = nn.Tanh()
        self.down = nn.Linear(2 * D, D)
        with torch.no_grad():  # a branch as large as the stream it adds to, as in a trained model
            self.down.weight.mul_(4.0)

    def forward(self, x):  # [T, D]
        return x + self.down(self.act(self.up(self.norm(x))))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(97, D)
        self.layers = nn.ModuleList(Block() for _ in range(6))

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return x


def _dump(path, net, ids, precision):
    # the blocks' outputs only: inside the broken block, the scaled linear
    # itself would fail outright
    h = capture.install(net, CaptureConfig(dump_dir=str(path), classes=frozenset({"Block", "Embedding"})),
                        run_info={"precision": precision})
    h.set_context(phase="prefill", step=0)
    with torch.no_grad():
        net(ids)
    h.close()
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    torch.manual_seed(0)
    ref = Stack()
    ids = torch.randint(0, 97, (48,))
    clean = copy.deepcopy(ref).to(torch.bfloat16)
    broken = copy.deepcopy(clean)
    with torch.no_grad():
        broken.layers[3].up.weight.mul_(1.05)
    return {"ref": _dump(root / "ref", ref, ids, "fp32"), "clean": _dump(root / "clean", clean, ids, "bf16"),
            "broken": _dump(root / "broken", broken, ids, "bf16")}


def test_a_five_percent_weight_error_at_bf16_is_placed_by_the_profile(runs):
    res = layer_bisect(runs["ref"], runs["broken"])
    assert not res.compare.failed          # no pair fails the fixed bf16 limits...
    assert res.by_profile and res.exit_code == 1, res.message
    assert (res.layer, res.stage) == (3, "output"), res.message
    assert "by the error profile" in res.message and res.entries == [3]
    g = res.curve.set_index("layer")["growth"]
    assert g[3] > 2.5 * g.drop(3).median()


def test_the_clean_bf16_target_has_no_profile_entry(runs):
    res = layer_bisect(runs["ref"], runs["clean"])
    assert not res.by_profile and res.key is None and res.exit_code == 0, res.message


def test_the_cli_reports_it(runs):
    r = CliRunner().invoke(cli, ["layer-bisect", "--ref", runs["ref"], "--target", runs["broken"]])
    assert r.exit_code == 1 and "error enters at layer 3, stage output" in r.output, r.output
