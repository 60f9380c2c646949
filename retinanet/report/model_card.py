"""The model card beside ``best.pt``: what was trained on what, how long, with which result, by which code.

``model_card(...)`` gathers the facts (plain data, ``model_card.json``) and ``markdown(card)`` writes them
for people (``model_card.md``). ``Checkpointer.mark_best`` writes both each time ``best.pt`` changes, so
the card always describes the ``best.pt`` beside it: the epoch that made it best, its metrics, and the
training up to that epoch.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from retinanet.budget import train_seconds
from retinanet.evaluation import STAT_NAMES, judged_metrics
from retinanet.files import atomic_write_json, atomic_write_text

HEADLINE = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


def model_card(config: dict, label_map: dict, provenance: dict | None, history: list[dict], metrics: dict | None,
               step: int, parameters: int, checkpoint: str = "best.pt") -> dict:
    """The facts of a checkpoint: ``config`` (resolved), ``label_map``, ``provenance`` (``retinanet.report.provenance``),
    ``history`` up to and including its epoch, ``metrics`` (the evaluation that made it best), ``step``."""
    provenance = provenance or {}
    trainer = config.get("trainer", {})
    last = history[-1] if history else {}
    judged = judged_metrics(last)  # of the EMA weights when the run keeps an EMA
    seconds = train_seconds(history)
    images = sum(e["train"]["images"] for e in history)
    names = dict(zip(label_map["category_ids"], label_map["class_names"]))
    per_class = {names.get(int(cat), str(cat)): ap for cat, ap in (metrics or {}).get("per_class", {}).items()}
    return {
        "checkpoint": checkpoint,
        "model": {"name": config.get("model", {}).get("name"), "parameters": int(parameters),
                  "classes": list(label_map["class_names"]), "category_ids": list(label_map["category_ids"])},
        "data": provenance.get("data", {"name": config.get("data", {}).get("name")}),
        "training": {"epoch": last.get("epoch"), "epochs_planned": trainer.get("epochs"), "steps": int(step),
                     "train_seconds": seconds, "images_seen": images, "images_per_s": images / seconds if seconds else None,
                     "batch_size": trainer.get("batch_size"), "optimizer": _target(config.get("optim")),
                     "lr": (config.get("optim") or {}).get("lr"), "schedule": _target(config.get("schedule")),
                     "precision": trainer.get("precision"), "ema_decay": (trainer.get("ema") or {}).get("decay")},
        "result": None if metrics is None else {
            "split": "val", "weights": "ema" if judged is not None and judged is last.get("val_ema") else "model",
            "images": metrics.get("images"),
            "stats": dict(metrics["stats"]), "per_class_ap": per_class},
        "versions": provenance.get("versions"),
        "git": provenance.get("git"),
        "run_started": provenance.get("created"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _target(node) -> str | None:
    return str(node["_target_"]).rsplit(".", 1)[-1] if isinstance(node, dict) and "_target_" in node else None


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(card: dict) -> str:
    """``card`` for people: a short Markdown page."""
    model, data, train, result = card["model"], card["data"], card["training"], card["result"]
    versions, git = card.get("versions") or {}, card.get("git") or {}
    lines = [f"# Model card: {card['checkpoint']}", "",
             f"RetinaNet `{model['name']}` ({model['parameters'] / 1e6:.2f}M parameters), {len(model['classes'])} "
             f"classes, trained on **{data.get('name')}**: the weights after epoch {train['epoch']} (step "
             f"{train['steps']}), the best validation AP of the run when they were saved.", ""]
    lines += ["## Result", ""]
    if result is None:
        lines += ["Not evaluated.", ""]
    else:
        weights = "EMA weights" if result["weights"] == "ema" else "weights"
        lines += [f"COCO evaluation on the val split ({result['images']} images, the {weights}):", "",
                  "| " + " | ".join(HEADLINE) + " |", "|" + "---|" * len(HEADLINE),
                  "| " + " | ".join(_num(result["stats"].get(k)) for k in HEADLINE) + " |", "",
                  "| class | AP |", "|---|---|"]
        lines += [f"| {name} | {_num(ap)} |" for name, ap in result["per_class_ap"].items()]
        lines += ["", "All 12 COCO numbers: " + ", ".join(f"{k} {_num(result['stats'].get(k))}" for k in STAT_NAMES), ""]
    lines += ["## Data", "", f"Classes: {', '.join(model['classes'])}.", ""]
    splits = [s for s in ("train", "val") if s in data]
    if splits:
        lines += ["| split | images | boxes | annotations | sha256 |", "|---|---|---|---|---|"]
        lines += [f"| {s} | {data[s]['images']} | {data[s]['boxes']} | `{data[s]['annotations']}` | "
                  f"`{data[s]['sha256'][:16]}…` |" for s in splits]
        lines += ["", "(full sha256 and image folders in model_card.json)", ""]
    rate = "n/a" if train["images_per_s"] is None else f"{train['images_per_s']:.1f}"
    lines += ["## Training", "",
              f"- {train['steps']} steps, {train['epoch']} epochs (of {train['epochs_planned']} planned), "
              f"{train['train_seconds']:.0f} s of training, {rate} images/s ({train['images_seen']} images)",
              f"- batch {train['batch_size']} per process, {train['optimizer']} lr {train['lr']}, {train['schedule']} "
              f"schedule, precision {train['precision']}, EMA decay {train['ema_decay']}",
              "- the full resolved config: `torch.load(\"best.pt\", weights_only=True)[\"config\"]`", ""]
    commit = git.get("commit")
    state = "" if commit is None else (" (with uncommitted changes)" if git.get("dirty") else "")
    lines += ["## Code", "",
              f"- retinanet {versions.get('retinanet')}, git commit {commit or 'unknown (not a git checkout)'}{state}",
              f"- python {versions.get('python')}, torch {versions.get('torch')}, torchvision "
              f"{versions.get('torchvision')}, pycocotools {versions.get('pycocotools')}",
              f"- written {card.get('created')}", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, card: dict) -> tuple[Path, Path]:
    """``model_card.json`` and ``model_card.md`` into ``folder`` (atomically); returns their paths."""
    folder = Path(folder)
    atomic_write_json(card, folder / "model_card.json")
    atomic_write_text(markdown(card), folder / "model_card.md")
    return folder / "model_card.json", folder / "model_card.md"
