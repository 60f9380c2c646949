"""``logger=csv``: ``<run dir>/metrics.csv``, one row per logged step, per evaluation and for the final
metrics, and ``<run dir>/hparams.csv`` (``key,value``).

``metrics.csv`` has the columns ``step``, ``time`` (seconds since the epoch) and one per tag
(``train/loss``, ``val/AP``, ``final/AP``, ...): a row fills the tags it has and leaves the others empty,
so ``pandas.read_csv`` gives one frame and ``csv.DictReader`` one dict per row. Rows are appended and
flushed as they come (a crash keeps every row written); a new tag rewrites the file once with the wider
header (atomically). A resumed run drops the rows after its checkpoint's step. The pictures and the model
card are already files of the run dir: nothing to copy.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from retinanet.files import atomic_write_text
from retinanet.report.loggers.base import RunLogger

FIXED = ("step", "time")


class CsvLogger(RunLogger):
    name = "csv"

    def __init__(self, run_dir: str | Path, resumed_step: int = 0):
        self.path, self.hparams_path = Path(run_dir) / "metrics.csv", Path(run_dir) / "hparams.csv"
        self.columns, rows = list(FIXED), []
        if self.path.is_file():  # a resumed run: keep the rows up to its checkpoint's step
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or FIXED)
                rows = [r for r in reader if _step(r) is not None and _step(r) <= resumed_step]
        self._rewrite(rows)

    def log_hparams(self, hparams: dict) -> None:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["key", "value"])
        writer.writerows(sorted(hparams.items()))
        atomic_write_text(out.getvalue(), self.hparams_path)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self._append({"step": step, "time": f"{time.time():.3f}", **scalars})

    def log_final(self, hparams: dict, metrics: dict[str, float], step: int) -> None:
        self._append({"step": step, "time": f"{time.time():.3f}", **{f"final/{k}": v for k, v in metrics.items()}})

    def _append(self, row: dict) -> None:
        new = [k for k in row if k not in self.columns]
        if new:  # a new tag: the file again with the wider header
            with self.path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            self.columns += new
            self._rewrite(rows + [row])
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)

    def _rewrite(self, rows: list[dict]) -> None:
        out = io.StringIO()
        writer = csv.DictWriter(out, self.columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out.getvalue(), self.path)


def _step(row: dict) -> int | None:
    try:
        return int(row["step"])
    except (KeyError, TypeError, ValueError):  # a row cut short by a crash
        return None
