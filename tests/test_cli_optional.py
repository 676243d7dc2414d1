"""A command whose optional dependency is missing says how to install it (exit 2)."""

import builtins
import sys

from click.testing import CliRunner


def test_missing_reference_extra_is_one_clear_message(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name.split(".")[0] == "transformers":
            raise ModuleNotFoundError("No module named 'transformers'", name="transformers")
        return real_import(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m.split(".")[0] in ("transformers", "reference_models", "runners")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", no_transformers)
    from parity.cli import cli

    r = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "demo")])
    assert r.exit_code == 2
    assert "'reference' extra" in r.output and "pip install -e '.[reference]'" in r.output
    assert "Traceback" not in r.output
