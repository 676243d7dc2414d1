import pytest

from parity.errors import ParityError
from parity.outdir import prepare_out


def test_refuses_non_empty_then_removes_only_owned_entries(tmp_path):
    out = tmp_path / "out"
    (out / "plots").mkdir(parents=True)
    (out / "summary.md").write_text("old")
    (out / "notes.txt").write_text("mine")
    owns = {"plots", "summary.md"}.__contains__
    with pytest.raises(ParityError, match="not empty"):
        prepare_out(out, False, owns)
    assert (out / "summary.md").exists()
    prepare_out(out, True, owns)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ParityError, match="not a folder"):
        prepare_out(tmp_path / "f", True, lambda name: True)
