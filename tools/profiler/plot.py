"""report.png: one panel per mode that reads data (loader, e2e), a bar per configuration coloured by backend
with the slowest and fastest window as whiskers, and the model ceiling as a dashed line per batch/image
size. Unstable rows are hatched, pale and labelled `unstable`; failed rows say `error`. Model-only profiles
get bars of their own."""

from __future__ import annotations

import os
from typing import Any

BACKEND_COLOURS = {"dali-gpu": "tab:green", "dali-cpu": "tab:olive", "pytorch": "tab:blue", "synthetic": "tab:gray"}
PANEL_TITLES = {"loader": "loader alone", "e2e": "training step fed by the loader",
                "model": "training step on synthetic data (ceiling)"}


def plot_report(report: Any, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tools.profiler.row import fastest_model_rows

    panels = [m for m in ("loader", "e2e") if any(r.config.mode == m for r in report.rows)] or ["model"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.6 * len(report.rows) + 3), 3.6 * len(panels)),
                             squeeze=False)
    ceilings = fastest_model_rows(report.rows)  # (batch, px) -> the fastest model row
    for ax, mode in zip(axes[:, 0], panels, strict=True):
        rows = [r for r in report.rows if r.config.mode == mode]
        values = [r.images_per_sec_per_gpu if r.ok else 0.0 for r in rows]
        # whiskers: the slowest and fastest timed window (node scale: rank) around the median bar
        spread = [[v - r.images_per_sec_min if r.ok else 0.0 for v, r in zip(values, rows, strict=True)],
                  [r.images_per_sec_max - v if r.ok else 0.0 for v, r in zip(values, rows, strict=True)]]
        bars = ax.bar(range(len(rows)), values, color=[BACKEND_COLOURS.get(r.config.backend, "tab:purple")
                                                       for r in rows], yerr=spread, capsize=3, ecolor="0.3")
        for x, (bar, r) in enumerate(zip(bars, rows, strict=True)):
            if not r.ok:
                ax.text(x, 0, "error", rotation=90, ha="center", va="bottom", fontsize=8, color="tab:red")
            elif r.unstable:
                bar.set_alpha(0.35)
                bar.set_hatch("//")
                ax.text(x, bar.get_height() / 2, "unstable", rotation=90, ha="center", va="center", fontsize=8,
                        color="tab:red", bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
        if mode != "model":
            for (batch_size, image_size), ceiling in ceilings.items():
                style = "--" if not ceiling.unstable else ":"
                ax.axhline(ceiling.images_per_sec_per_gpu, color="black", linestyle=style, linewidth=1)
                ax.text(len(rows) - 0.5, ceiling.images_per_sec_per_gpu,
                        f" ceiling bs{batch_size} {image_size}px: {ceiling.images_per_sec_per_gpu:.0f}"
                        + (" (unstable)" if ceiling.unstable else ""), va="bottom", ha="right", fontsize=8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r.config.label() for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("images/s per GPU")
        ax.set_title(PANEL_TITLES[mode])
        top = [r.images_per_sec_max for r in rows if r.ok]
        ax.set_ylim(0, max([*top, *(c.images_per_sec_per_gpu for c in ceilings.values()), 1.0]) * 1.15)
    machine = report.machine
    ranks = f", {report.ranks} ranks" if report.ranks > 1 else ""
    fig.suptitle(f"{report.settings.get('arch')} on {machine.get('gpu') or 'CPU'}, "
                 f"{machine.get('cpu_usable')} CPU cores{ranks}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
