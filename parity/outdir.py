"""Output folders that a tool fills: never mixed, never wiped blindly."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from parity.errors import ParityError


def prepare_out(out: Path, force: bool, owns: Callable[[str], bool], *, label: str = "--out",
                hint: str = "give --force to replace it", error: type[ParityError] = ParityError) -> None:
    """Make ``out`` ready to write. A non-empty folder is refused unless
    ``force``; with it, only the entries ``owns(name)`` claims (what an
    earlier run of the same tool wrote) are removed, anything else of the
    user's stays."""
    if out.exists() and not out.is_dir():
        raise error(f"{label} {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise error(f"{label} {out} is not empty; {hint}")
        for child in out.iterdir():
            if owns(child.name):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
