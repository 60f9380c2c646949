"""Plot the focal loss against p_t for gamma in (0, 0.5, 1, 2, 5), as Figure 1 of Lin et al. 2017, and its gradient.

Left: ``FL(p_t) = -(1 - p_t)^gamma log(p_t)`` (alpha off; gamma = 0 is the cross entropy). Right: the
gradient the classifier receives, ``-dFL/dx`` for the logit ``x`` of a positive (``p_t = sigmoid(x)``).
Both panels come from ``retinanet.losses.sigmoid_focal_loss`` and autograd, in float64.

Usage: ``python scripts/plot_focal_loss.py [--out PATH]`` (default ``outputs/plots/focal_loss.png``);
``make plots`` runs it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from retinanet.losses import sigmoid_focal_loss  # noqa: E402

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
DEFAULT_OUT = Path("outputs/plots/focal_loss.png")


def curves(gammas=GAMMAS, points: int = 999) -> dict:
    """``p_t [N]`` and, per gamma, the loss ``[N]`` and ``-dFL/dx [N]`` of a positive with ``sigmoid(x) = p_t``."""
    p_t = torch.linspace(0.0, 1.0, points + 2, dtype=torch.float64)[1:-1]  # open interval (0, 1)
    out = {"p_t": p_t, "loss": {}, "grad": {}}
    for gamma in gammas:
        x = torch.logit(p_t).requires_grad_()
        loss = sigmoid_focal_loss(x[:, None], torch.ones(points, 1, dtype=torch.float64), None, gamma, "none")[:, 0]
        (grad,) = torch.autograd.grad(loss.sum(), x)
        out["loss"][gamma], out["grad"][gamma] = loss.detach(), -grad
    return out


def plot(path: Path, gammas=GAMMAS) -> Path:
    """Write the two-panel PNG to ``path`` (folders created) and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(gammas)
    p_t = data["p_t"].numpy()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.3))
    for gamma in gammas:
        label = f"$\\gamma$ = {gamma:g}" + (" (CE)" if gamma == 0 else "")
        left.plot(p_t, data["loss"][gamma].numpy(), label=label)
        right.plot(p_t, data["grad"][gamma].numpy(), label=label)
    left.axvspan(0.6, 1.0, color="0.9", zorder=0)
    left.text(0.8, 2.2, "well-classified\nexamples", ha="center")
    left.set(xlim=(0, 1), ylim=(0, 5), xlabel="probability of ground truth class $p_t$", ylabel="loss",
             title="$FL(p_t) = -(1 - p_t)^\\gamma \\log(p_t)$")
    right.set(xlim=(0, 1), ylim=(0, None), xlabel="probability of ground truth class $p_t$",
              ylabel="$-\\partial FL / \\partial x$ (logit $x$ of a positive)", title="gradient")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    path = plot(parser.parse_args(argv).out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
