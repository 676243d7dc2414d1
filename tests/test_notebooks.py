"""The walkthrough notebooks run top to bottom on the tiny checkpoint; each
ends in an assert that parity found the fault it injected."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (ROOT / "checkpoints" / "tiny-gsm8k" / "config.json").is_file(),
                       reason="tiny checkpoint not committed"),
]


def test_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == ["01_layer_bisect.ipynb", "02_slot_invariance.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=180,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "the notebook shows no plot"
