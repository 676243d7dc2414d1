"""`parity summary-diff`: screening two dumps by their summaries alone."""

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from parity import capture
from parity.cli import cli
from parity.compare.summaries import summary_diff
from parity.config import CaptureConfig


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def _dump(path, net, x, mode="stats"):
    h = capture.install(net, CaptureConfig(dump_dir=str(path), mode=mode, classes=frozenset({"Sequential"}),
                                           calls=None))
    for step in range(2):
        h.set_context(phase="decode", step=step)
        net(x)
    h.close()
    return str(path)


@pytest.fixture
def net_and_input():
    torch.manual_seed(0)
    return Net(), torch.randn(5, 16)


def run(*args):
    res = CliRunner().invoke(cli, list(args))
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res


def test_identical_runs_are_consistent(tmp_path, net_and_input):
    net, x = net_and_input
    a, b = _dump(tmp_path / "a", net, x), _dump(tmp_path / "b", net, x)
    r = run("summary-diff", "--ref", a, "--target", b)
    assert r.exit_code == 0, r.output
    res = summary_diff(a, b)
    assert len(res.table) == 8 and set(res.table["verdict"]) == {"consistent"}


def test_a_changed_layer_is_the_first_divergence(tmp_path, net_and_input):
    net, x = net_and_input
    a = _dump(tmp_path / "a", net, x)
    with torch.no_grad():
        net.layers[2][0].weight.mul_(1.05)
    b = _dump(tmp_path / "b", net, x)
    res = summary_diff(a, b)
    first = res.first_divergence()
    assert first["layer"] == 2 and first["step"] == 0 and first["verdict"] == "fail"
    assert set(res.table[res.table["layer"] < 2]["verdict"]) == {"consistent"}
    r = run("summary-diff", "--ref", a, "--target", b, "--format", "json")
    assert r.exit_code == 1 and "layer 2, layers.2:output (decode step 0)" in r.output


def test_nan_on_one_side_fails_and_full_dumps_pair_with_stats_dumps(tmp_path, net_and_input):
    net, x = net_and_input
    a = _dump(tmp_path / "a", net, x, mode="full")
    with torch.no_grad():
        net.layers[3][0].bias[0] = float("nan")
    b = _dump(tmp_path / "b", net, x)
    res = summary_diff(a, b)
    first = res.first_divergence()
    assert first["layer"] == 3 and first["reason"].startswith("NaN/Inf count 0 vs")


def test_summaries_over_different_tokens_are_skipped_not_judged(tmp_path, net_and_input):
    net, x = net_and_input
    a = _dump(tmp_path / "a", net, x)
    b = _dump(tmp_path / "b", net, torch.cat([x, x[:1]]))  # one more token: other elements
    res = summary_diff(a, b)
    assert set(res.table["verdict"]) == {"skip"} and res.exit_code == 0
    assert "not comparable: 80 vs 96 elements" in res.table["reason"].iat[0]


def test_bad_input_exit_2(tmp_path, net_and_input):
    net, x = net_and_input
    a = _dump(tmp_path / "a", net, x)
    r = run("summary-diff", "--ref", a, "--target", a, "--filter", "nothing-matches")
    assert r.exit_code == 2 and "no record with a summary matches --filter" in r.output
    r = run("summary-diff", "--ref", a, "--target", str(tmp_path / "missing"))
    assert r.exit_code == 2 and "Traceback" not in r.output
