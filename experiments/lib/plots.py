"""PNG figures shared by binaries (rendered off-screen with matplotlib's Agg backend, returned as bytes)."""

from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def png(fig) -> bytes:
    """The PNG bytes of a matplotlib figure (120 dpi, tight), closing it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()

def plot_saliency(scores: dict[str, np.ndarray], names: list[str]) -> bytes:
    """PNG heat map: per model, attention modules (rows) x heads (columns) of task-vector L2 norms."""
    prefixes = list(scores)
    fig, axes = plt.subplots(1, len(names), figsize=(3 + 2.5 * len(names), 0.3 * len(prefixes) + 1.5), squeeze=False)
    top = max(float(s.max()) for s in scores.values()) or 1.0
    for m, (ax, name) in enumerate(zip(axes[0], names)):
        image = ax.imshow(np.stack([scores[p][m] for p in prefixes]), aspect="auto", cmap="viridis", vmin=0, vmax=top)
        ax.set_title(os.path.basename(name.rstrip("/")), fontsize=8)
        ax.set_xlabel("head")
        ax.set_yticks(range(len(prefixes)), [p.removeprefix("model.") for p in prefixes] if m == 0 else [""] * len(prefixes),
                      fontsize=6)
    fig.colorbar(image, ax=axes[0].tolist(), label="||task vector|| over the head's slices")
    return png(fig)


def plot_losses(losses: list[float], first_step: int, ylabel: str = "cross-entropy (scored tokens)") -> bytes:
    """PNG of the training loss per step (steps first_step+1, ...)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(first_step + 1, first_step + len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return png(fig)
