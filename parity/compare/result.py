"""The result shape shared by the pairwise commands that judge whole records."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


@dataclass
class TableResult:
    """One row per judged pair (with a ``verdict`` column), the keys that found
    no partner on the other side, and notes for the user."""

    table: pd.DataFrame
    only_ref: list[str] = field(default_factory=list)
    only_target: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(len(self.table)) and bool((self.table["verdict"] == "fail").any())

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0
