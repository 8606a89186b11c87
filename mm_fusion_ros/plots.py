"""Figures written to files: matplotlib on the Agg backend (no display on a robot or in CI)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use (it is slow to import)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path, log: Callable[[str], None] = print) -> Path:
    """Save under a temporary name, then rename: a reader never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    log(f"wrote {path}")
    return path


def plot_replay(t: np.ndarray, command: np.ndarray, contribution: np.ndarray, mask: np.ndarray,
                compute_ms: np.ndarray, dof_names: list[str], modalities: list[str], path: str | Path,
                title: str, log: Callable[[str], None] = print) -> Path:
    """Commands, modality contributions with masked spans, and compute time per tick, over bag time."""
    plt = pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 8), sharex=True,
                                        gridspec_kw={"height_ratios": [3, 2, 1.2]})
    for i, name in enumerate(dof_names):
        ax1.plot(t, command[:, i], lw=0.9, label=name)
    ax1.set_ylabel("command (after safety)")
    ax1.legend(loc="upper right", fontsize=7, ncol=len(dof_names))
    ax2.stackplot(t, contribution.T, labels=modalities, alpha=0.85)
    # A masked modality: a bar under the plot, one row per modality, where the mask was 0.
    for i, name in enumerate(modalities):
        masked = mask[:, i] < 0.5
        if masked.any():
            ax2.fill_between(t, -0.04 * (i + 1), -0.04 * i, where=masked, step="mid", color=f"C{i}",
                             alpha=0.9, linewidth=0)
    ax2.set_ylim(-0.04 * len(modalities), 1.0)
    ax2.set_ylabel("modality contribution\n(bars below: masked)")
    ax2.legend(loc="upper right", fontsize=7, ncol=len(modalities))
    ax3.plot(t, compute_ms, lw=0.6, color="k")
    ax3.set_ylabel("tick compute (ms)")
    ax3.set_xlabel("bag time (s)")
    fig.suptitle(title)
    fig.tight_layout()
    out = save_figure(fig, path, log)
    plt.close(fig)
    return out
