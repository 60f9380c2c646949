"""Summaries of a Hydra multirun: one row per run (overrides + final COCO numbers), sorted by AP,
written as Markdown and CSV, and a heatmap of AP over two swept keys (default loss.gamma x loss.alpha).

A run dir is any folder under the sweep dir holding ``.hydra/overrides.yaml``; its numbers come
from ``metrics.json`` (``{"final": {"stats": {...}}}``, written by the trainer at the end of a
run) and the swept values from the resolved ``config.yaml`` (falling back to ``.hydra/config.yaml``),
so a key that a run did not override still shows its default. Runs that crashed or are still
going are listed last with their status.

``SummarizeSweep`` is a Hydra callback that writes the summary when a multirun ends.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from retinanet.evaluation import STAT_NAMES

log = logging.getLogger(__name__)

MD_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")  # the Markdown table's numbers (CSV has all 12)


@dataclass
class Run:
    """One run of a sweep: where it is, what was overridden, the resolved config and the final numbers."""

    path: Path
    overrides: list[str]
    config: dict = field(default_factory=dict)
    stats: dict | None = None  # final COCO numbers; None if the run did not finish
    status: str = "ok"

    @property
    def override_map(self) -> dict[str, str]:
        """``{"loss.gamma": "2", "+sweep": "demo", ...}`` from ``key=value`` strings."""
        return dict(o.split("=", 1) if "=" in o else (o, "") for o in self.overrides)

    def value(self, key: str):
        """The resolved config value of a dotted ``key`` (else its override string, else None)."""
        node = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return _parse_scalar(self.override_map.get(key))
            node = node[part]
        return node


def _parse_scalar(text: str | None):
    return None if text is None else yaml.safe_load(text)


def _read_yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def load_run(run_dir: Path) -> Run:
    """Read one run dir (``.hydra/overrides.yaml`` must exist; anything else may be missing)."""
    run_dir = Path(run_dir)
    overrides = [str(o) for o in (_read_yaml(run_dir / ".hydra" / "overrides.yaml") or [])]
    config = {}
    for name in ("config.yaml", ".hydra/config.yaml"):
        if (run_dir / name).is_file():
            try:
                config = _read_yaml(run_dir / name) or {}
                break
            except yaml.YAMLError:  # .hydra/config.yaml may hold unresolved interpolations: still YAML, but be safe
                continue
    run = Run(run_dir, overrides, config)
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        run.status = "no metrics.json (failed or not started)"
        return run
    try:
        metrics = json.loads(metrics_file.read_text())
    except json.JSONDecodeError as err:
        run.status = f"unreadable metrics.json ({err})"
        return run
    final = metrics.get("final")
    if not final or "stats" not in final:
        run.status = f"unfinished ({len(metrics.get('history', []))} epochs done)"
        return run
    run.stats = {k: (None if v is None else float(v)) for k, v in final["stats"].items()}  # None: COCO's n/a
    return run


def collect_runs(sweep_dir) -> list[Run]:
    """Every run under ``sweep_dir`` (found by its ``.hydra/overrides.yaml``, at any depth), sorted by AP
    (best first; unfinished runs last, in folder order)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep dir not found: {sweep_dir}")
    runs = [load_run(p.parent.parent) for p in sorted(sweep_dir.glob("**/.hydra/overrides.yaml"))]
    if not runs:
        raise FileNotFoundError(f"no runs in {sweep_dir}: no <run>/.hydra/overrides.yaml below it "
                                "(is this the hydra.sweep.dir of a multirun?)")
    finished = sorted((r for r in runs if r.stats), key=lambda r: -(r.stats.get("AP") or -1.0))
    return finished + [r for r in runs if not r.stats]


def varying_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value differs between runs (or that only some runs set), in first-seen order."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.override_map if k not in keys]
    maps = [r.override_map for r in runs]
    return [k for k in keys if len({m.get(k) for m in maps}) > 1]


def common_overrides(runs: list[Run]) -> list[str]:
    vary = set(varying_keys(runs))
    return [o for o in runs[0].overrides if o.split("=", 1)[0] not in vary] if runs else []


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def to_csv(runs: list[Run], sweep_dir) -> str:
    """All runs: rank, run dir, every override (one string and one column per varying key), all 12 numbers, status."""
    keys = varying_keys(runs)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["rank", "run", "overrides", *keys, *STAT_NAMES, "status"])
    for i, run in enumerate(runs, 1):
        stats = run.stats or {}
        writer.writerow([i if run.stats else "", _relative(run.path, Path(sweep_dir)), " ".join(run.overrides),
                         *[run.override_map.get(k, "") for k in keys],
                         *[_fmt(stats.get(s)) for s in STAT_NAMES], run.status])
    return out.getvalue()


def to_markdown(runs: list[Run], sweep_dir) -> str:
    """A Markdown table: rank, the varying overrides, the main COCO numbers, the run dir; common overrides above it."""
    keys = varying_keys(runs)
    common = common_overrides(runs)
    lines = [f"Sweep `{sweep_dir}`: {len(runs)} runs, {sum(r.stats is not None for r in runs)} finished, "
             "sorted by val AP (COCO AP@[.5:.95])."]
    if common:
        lines.append("Common overrides: " + " ".join(f"`{o}`" for o in common))
    header = ["rank", *[f"`{k}`" for k in keys], *MD_STATS, "run"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join(" ---: " for _ in header) + "|"]
    for i, run in enumerate(runs, 1):
        stats = run.stats or {}
        cells = [str(i) if run.stats else "-", *[run.override_map.get(k, "") for k in keys]]
        cells += [_fmt(stats.get(s)) for s in MD_STATS] if run.stats else [run.status] + [""] * (len(MD_STATS) - 1)
        cells.append(f"`{_relative(run.path, Path(sweep_dir))}`")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _label(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return f"{value:g}"
    return str(value)  # null, auto, per-class lists


def _order(labels: set[str]) -> list[str]:
    """Numbers ascending first, then anything else alphabetically."""
    def key(s: str):
        try:
            return (0, float(s), s)
        except ValueError:
            return (1, 0.0, s)
    return sorted(labels, key=key)


def ap_grid(runs: list[Run], row_key: str = "loss.gamma", col_key: str = "loss.alpha", metric: str = "AP"):
    """``(row labels, col labels, mean metric [rows][cols] (None where no run), run count [rows][cols])``.

    Runs sharing a cell (e.g. different seeds) are averaged."""
    done = [r for r in runs if r.stats and r.stats.get(metric) is not None]
    rows = _order({_label(r.value(row_key)) for r in done})
    cols = _order({_label(r.value(col_key)) for r in done})
    sums = [[0.0] * len(cols) for _ in rows]
    counts = [[0] * len(cols) for _ in rows]
    for r in done:
        i, j = rows.index(_label(r.value(row_key))), cols.index(_label(r.value(col_key)))
        sums[i][j] += r.stats[metric]
        counts[i][j] += 1
    means = [[s / n if n else None for s, n in zip(srow, nrow)] for srow, nrow in zip(sums, counts)]
    return rows, cols, means, counts


def plot_heatmap(runs: list[Run], path, row_key: str = "loss.gamma", col_key: str = "loss.alpha",
                 metric: str = "AP") -> Path | None:
    """PNG heatmap of ``metric`` over (row_key, col_key), each cell annotated; None if no run finished."""
    rows, cols, means, counts = ap_grid(runs, row_key, col_key, metric)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array([[math.nan if v is None else v for v in row] for row in means])  # [rows, cols]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(cols), 1.0 + 0.75 * len(rows)), dpi=100)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")  # grey: no finished run
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
    finite = grid[np.isfinite(grid)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(len(rows)):
        for j in range(len(cols)):
            if counts[i][j]:
                text = f"{grid[i, j]:.3f}" + (f"\n(n={counts[i][j]})" if counts[i][j] > 1 else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=9,
                        color="black" if grid[i, j] > mid else "white")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(col_key)
    ax.set_ylabel(row_key)
    ax.set_title(f"val {metric}")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def summarize_sweep(sweep_dir, out_dir=None, row_key: str = "loss.gamma", col_key: str = "loss.alpha",
                    metric: str = "AP") -> dict:
    """Write ``summary.md``, ``summary.csv`` and ``heatmap.png`` (into ``out_dir``, default the sweep dir).

    Returns ``{"runs", "markdown", "csv", "heatmap"}`` (paths; heatmap None when no run finished)."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = collect_runs(sweep_dir)
    md_path, csv_path = out_dir / "summary.md", out_dir / "summary.csv"
    md_path.write_text(to_markdown(runs, sweep_dir))
    csv_path.write_text(to_csv(runs, sweep_dir))
    heatmap = plot_heatmap(runs, out_dir / "heatmap.png", row_key, col_key, metric)
    return {"runs": runs, "markdown": md_path, "csv": csv_path, "heatmap": heatmap}


try:  # Hydra is a dependency; the import is guarded only so that this module stays usable on its own
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object


class SummarizeSweep(Callback):
    """Hydra callback: summarise the sweep dir when a multirun ends (``hydra.callbacks`` in the config)."""

    def __init__(self, row_key: str = "loss.gamma", col_key: str = "loss.alpha", metric: str = "AP"):
        self.row_key, self.col_key, self.metric = row_key, col_key, metric

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            out = summarize_sweep(sweep_dir, row_key=self.row_key, col_key=self.col_key, metric=self.metric)
        except Exception as err:  # a summary problem must not hide the runs' own results
            log.warning("could not summarise the sweep in %s: %s", sweep_dir, err)
            return
        print("\n" + out["markdown"].read_text())
        log.info("sweep summary: %s, %s%s", out["markdown"], out["csv"],
                 f", {out['heatmap']}" if out["heatmap"] else "")
