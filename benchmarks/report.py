"""The benchmark table: one row per measured quantity, printed as Markdown and kept in the JSON."""

from __future__ import annotations


def row(item: str, what: str, ours: str, theirs: str, ratio: float | None, target: str, met: bool | None) -> dict:
    return {"item": item, "what": what, "ours": ours, "torchvision": theirs,
            "ratio": None if ratio is None else round(float(ratio), 3), "target": target, "met": met}


def seconds(value: float) -> str:
    return f"{value * 1e3:.0f} ms" if value < 10 else f"{value:.1f} s"


def mib(value: float) -> str:
    return f"{value:.0f} MiB"


COLUMNS = ("item", "what", "ours", "torchvision", "ratio", "target", "met")


def markdown(rows: list[dict]) -> str:
    """A Markdown table of ``rows`` (docs/notes/benchmarks.md shows one)."""
    def cell(r, key):
        v = r[key]
        if key == "met":
            return "-" if v is None else ("yes" if v else "**no**")
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(r, k) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)
