"""The run ledger: one row per optimiser step, written to ``<run_dir>/ledger.parquet``.

The ledger is the run's record of truth for analysis (weights, counts, losses, rewards, validation,
timings; schema in ``docs/internals.md``). It is rewritten atomically (temp file, then rename) at every
checkpoint and at the end, so a killed run leaves either the previous complete file or the new one. On
resume the rows past the checkpoint are dropped, so the resumed ledger has every step exactly once.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.parquet"


class Ledger:
    """An in-memory list of step rows with atomic parquet persistence."""

    def __init__(self, path: str | os.PathLike[str], rows: list[dict[str, Any]] | None = None) -> None:
        """Create a ledger that persists to ``path``, optionally starting from existing ``rows``."""
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = list(rows or [])

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Ledger:
        """Read an existing ledger (an absent file gives an empty ledger)."""
        p = Path(path)
        if not p.exists():
            return cls(p)
        try:
            table = pq.read_table(p)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"ledger {str(p)!r} is not a readable parquet file: {exc}") from None
        return cls(p, table.to_pylist())

    def __len__(self) -> int:
        """Number of rows (steps) recorded."""
        return len(self.rows)

    @property
    def last_step(self) -> int:
        """The step of the last row, 0 when empty."""
        return int(self.rows[-1]["step"]) if self.rows else 0

    def append(self, row: dict[str, Any]) -> None:
        """Add one step's row; steps must strictly increase."""
        step = int(row["step"])
        if self.rows and step <= self.last_step:
            raise RuntimeError(f"ledger step {step} does not follow {self.last_step}")
        self.rows.append({k: _plain(v) for k, v in row.items()})

    def truncate(self, num_rows: int) -> None:
        """Keep the first ``num_rows`` rows (used on resume to drop steps after the checkpoint)."""
        if num_rows > len(self.rows):
            raise ValueError(
                f"checkpoint expects {num_rows} ledger rows but {self.path} holds only {len(self.rows)}"
            )
        dropped = len(self.rows) - num_rows
        if dropped:
            log.info("ledger: dropping %d rows recorded after the checkpoint", dropped)
        del self.rows[num_rows:]

    def to_table(self) -> pa.Table:
        """The rows as an Arrow table; columns are the union of all rows' keys (missing = null)."""
        columns: dict[str, None] = {}
        for row in self.rows:
            for key in row:
                columns.setdefault(key, None)
        data = {c: [row.get(c) for row in self.rows] for c in columns}
        return pa.table(data)

    def flush(self) -> None:
        """Write the ledger atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        pq.write_table(self.to_table(), tmp)
        os.replace(tmp, self.path)


def _plain(value: Any) -> Any:
    """Numpy scalars to Python scalars, so Arrow infers stable column types."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return float("nan")
    return value


def signals_row(
    domain_names: list[str],
    info: dict[str, Any],
    *,
    step: int,
    tokens_total: int,
    wall_time: float,
    reward: float,
) -> dict[str, Any]:
    """Build the ledger columns that come from one env step's ``info``."""
    sig = info["signals"]
    row: dict[str, Any] = {
        "step": step,
        "tokens": tokens_total,
        "wall_time": wall_time,
        "loss": float(sig.loss),
        "lr": float(sig.lr),
        "grad_norm": float(sig.grad_norm),
        "skipped": bool(sig.skipped),
        "reward": float(reward),
    }
    weights_K = np.asarray(info.get("weights_K", sig.weights_K), dtype=float)
    scores_K = info.get("scores_K")
    parts_K = info.get("reward_parts_K")
    for i, name in enumerate(domain_names):
        row[f"weight/{name}"] = float(weights_K[i])
        row[f"microbatches/{name}"] = int(sig.microbatches_K[i])
        row[f"tokens/{name}"] = int(sig.tokens_K[i])
        row[f"loss/{name}"] = float(sig.loss_K[i])
        if scores_K is not None:
            row[f"score/{name}"] = float(scores_K[i])
        if parts_K is not None:
            row[f"reward_part/{name}"] = float(parts_K[i])
    for key, seconds in sig.timings.items():
        row[f"time/{key}_s"] = float(seconds)
    return row
