"""The report: report.json (every figure, null where not measurable), report.md (corpus, machine, the table),
report.png (`plot_report`), and what the figures were measured on (`describe_corpus`, `describe_machine`).

An unstable row (tools/profiler/row.py) keeps its figures in parentheses and says why in its note: it is
shown, never presented as a result. Absolute images/s only compare between equal corpora and machines.

report.png: one panel per mode that reads data (loader, e2e), a bar per configuration coloured by backend
with the slowest and fastest window as whiskers, and the model ceiling as a dashed line per batch/image
size. Unstable rows are hatched, pale and labelled `unstable`; failed rows say `error`. Model-only profiles
get bars of their own.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.profiler.plan import AXES, LOADER_AXES, STEP_AXES
from tools.profiler.row import ProfileRow, fastest_model_rows

NA = "n/a"
LEGEND = ("img/s/GPU: median over timed windows (min-max beside it). data wait: share of the e2e wall time the "
          "step loop spent in next(loader). req/img (an object store): requests sent to it per image read (how they "
          "were counted: see Notes). CPU cores: CPU seconds of this process and its workers per wall "
          "second. "
          "vs ceiling: against the model mode (synthetic data) at the same batch and image size, measured before "
          "and after the data rows. threads needed: whole CPU threads this loader needs to feed the ceiling "
          "(assumes linear scaling; the thread sweep shows whether it holds). (...) marks an unstable row: its "
          "figures are not a result, its note says why. See docs/profiling.md.")
NODE_LEGEND = ("Node scale: img/s/GPU is the mean over ranks measured together, min-max the slowest and fastest "
               "rank, total the node's sum, alone rank 0 with the other ranks idle (same run), scaling = mean / alone.")


@dataclass
class Report:
    """Everything one profile measured, and the files it writes."""

    corpus: dict[str, Any]
    machine: dict[str, Any]
    settings: dict[str, Any]
    rows: list[ProfileRow]
    notes: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> int:
        return max((row.ranks for row in self.rows), default=1)

    def to_dict(self) -> dict[str, Any]:
        return {"corpus": self.corpus, "machine": self.machine, "settings": self.settings, "notes": self.notes,
                "rows": [row.to_dict() for row in self.rows]}

    def table_markdown(self) -> str:
        """The side-by-side table: one line per configuration, `n/a` where a figure cannot be measured."""
        # an axis's column (tools/profiler/plan.py): always, unless the axis is optional and no row sets it
        loader, step = ([name for name in names if not AXES[name].optional
                         or any(getattr(row.config, name) is not None for row in self.rows)]
                        for names in (LOADER_AXES, STEP_AXES))
        cpu_model = any(row.config.model_threads is not None for row in self.rows)
        node = self.ranks > 1
        store = bool(self.settings.get("store"))  # an object store: requests per image (a folder sends none)
        head = ["mode", "backend", *(AXES[name].column or name for name in loader), "batch", "px",
                *(AXES[name].column or name for name in step), *(["model threads"] if cpu_model else []),
                "img/s/GPU", "min-max",
                *(["total", "alone", "scaling"] if node else []),
                "step ms", "data wait", *(["req/img"] if store else []), "CPU cores", "GPU util", "GPU mem GiB",
                "vs ceiling", "vs pytorch", "threads needed", "note"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            c = row.config
            cells = [c.mode, c.backend, *(_axis(getattr(c, name)) for name in loader), str(c.batch_size),
                     str(c.image_size), *(_axis(getattr(c, name)) for name in step),
                     *([_axis(c.model_threads)] if cpu_model else [])]
            if not row.ok:
                cells += [""] * (len(head) - len(cells) - 1) + ["ERROR: " + _cell(row.error)]
                lines.append("| " + " | ".join(cells) + " |")
                continue
            result = functools.partial(_result, stable=row.stable)
            memory = row.gpu_memory_used_gib if row.gpu_memory_used_gib is not None else row.gpu_memory_peak_gib
            cells += [result(_fmt(row.images_per_sec_per_gpu, "{:.0f}")),
                      f"{_fmt(row.images_per_sec_min, '{:.0f}')}-{_fmt(row.images_per_sec_max, '{:.0f}')}"]
            if node:
                cells += [result(_fmt(row.images_per_sec_total, "{:.0f}")), _fmt(row.solo_images_per_sec, "{:.0f}"),
                          result(_fmt(row.scaling_efficiency, "{:.2f}"))]
            cells += [
                _fmt(row.step_time_ms, "{:.1f}"),
                _fmt(row.data_wait_share, "{:.0%}", missing="-" if c.mode != "e2e" else NA),
                *([_fmt(row.requests_per_image, "{:.3g}") if c.mode != "model" else "-"] if store else []),
                _fmt(row.cpu_cores_busy, "{:.1f}"),
                _fmt(row.gpu_util_pct, "{:.0f}%"),
                _fmt(memory, "{:.1f}"),
                result(_fmt(row.vs_ceiling, "{:.2f}x")),
                result(_fmt(row.vs_pytorch, "{:.2f}x", missing="-" if c.mode == "model" else NA)),
                result(_fmt(row.threads_needed, "{}", missing="-" if c.mode != "loader" else NA)),
                _cell("; ".join([*(["UNSTABLE: " + "; ".join(row.unstable)] if row.unstable else []), *row.notes])),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def rank_table_markdown(self) -> str:
        """Node scale: each rank's median images/s per configuration."""
        lines = ["| configuration | " + " | ".join(f"rank {r}" for r in range(self.ranks)) + " | alone |",
                 "|" + "---|" * (self.ranks + 2)]
        for row in self.rows:
            if row.ok and row.per_rank_images_per_sec:
                cells = [f"{row.config.mode} {row.config.label()}", *(f"{v:.0f}" for v in row.per_rank_images_per_sec),
                         _fmt(row.solo_images_per_sec, "{:.0f}")]
                lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_markdown(self) -> str:
        """report.md: corpus, machine, settings, notes, the table and how to read it."""
        out = ["# saturate profile", ""]
        for title, section in (("Corpus", self.corpus), ("Machine", self.machine), ("Settings", self.settings)):
            out += [f"## {title}", ""]
            out += [f"- {k}: {_fmt(v, '{:.4g}' if isinstance(v, float) else '{}')}" for k, v in section.items()]
            out += [""]
        if self.notes:
            out += ["## Notes", ""] + [f"- {note}" for note in self.notes] + [""]
        out += ["## Results", "", self.table_markdown(), LEGEND, ""]
        if self.ranks > 1:
            out += ["## Per rank (images/s per GPU)", "", self.rank_table_markdown(), NODE_LEGEND, ""]
        return "\n".join(out)

    @staticmethod
    def prepare(out_dir: str | os.PathLike) -> Path:
        """Create `out_dir` before anything is measured, else a ValueError naming --out: found only by `write`,
        a file in its place or a folder that cannot be written cost every measurement of the run."""
        from shards.process import atomic_write

        out_dir = Path(out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            probe = out_dir / ".write-check"
            atomic_write(probe, "")
            probe.unlink()
        except OSError as err:
            raise ValueError(f"--out {out_dir}: cannot write there ({err.strerror or err})") from None
        return out_dir

    def write(self, out_dir: str | os.PathLike, *, plot: bool = True) -> dict[str, Path]:
        """Write report.json, report.md and (with `plot`) report.png into `out_dir` (created); returns their
        paths."""
        from shards.process import atomic_write

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "png": out_dir / "report.png"}
        atomic_write(paths["json"], json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        atomic_write(paths["md"], self.to_markdown())
        if plot:
            plot_report(self, paths["png"])
        return paths


def _result(text: str, *, stable: bool) -> str:
    """A figure of an unstable row goes in parentheses: shown, not presented as a result."""
    return text if stable or text in (NA, "-") else f"({text})"


def _axis(value: Any) -> str:
    """An axis's cell: `-` where it does not apply, on/off for a switch."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def _fmt(value: Any, spec: str = "{}", *, missing: str = NA) -> str:
    if value is None:
        return missing
    if isinstance(value, float) and not math.isfinite(value):
        return NA
    return spec.format(value)


# --- report.png -----------------------------------------------------------------------------------------
BACKEND_COLOURS = {"dali-gpu": "tab:green", "dali-cpu": "tab:olive", "pytorch": "tab:blue", "synthetic": "tab:gray"}
PANEL_TITLES = {"loader": "loader alone", "e2e": "training step fed by the loader",
                "model": "training step on synthetic data (ceiling)"}


def plot_report(report: Report, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


# --- what was measured on ------------------------------------------------------------------------------
RESOLUTION_SAMPLE = 256  # images whose JPEG header is read to describe the corpus resolution


def describe_corpus(shards_dir: str | os.PathLike, split: str, *, sample: int = RESOLUTION_SAMPLE) -> dict:
    """Images, classes, mean JPEG size (exact, from the DALI indexes) and mean resolution (JPEG headers of
    `sample` images spread evenly over the split; headers only, nothing is decoded)."""
    from PIL import Image

    from shards.schema import IMAGE_EXT, load_manifest, parse_index, shard_files
    from shards.store import open_store

    store = open_store(shards_dir)  # a folder or an s3:// URL: indexes and JPEG headers are read through it
    manifest = load_manifest(store, split)
    shard_files(store, manifest)  # every tar and index present and matching its record (errors name the file)
    members: list[tuple[str, int, int]] = []  # (tar name, offset, size) of every image, bytes
    for record in manifest.shards:
        for sample_members in parse_index(store.read_text(record.index), store.url(record.index)):
            members += [(record.name, m.offset, m.size) for m in sample_members if m.ext == IMAGE_EXT]
    if not members:
        raise ValueError(f"{shards_dir}: the {split} indexes list no .{IMAGE_EXT} member")
    chosen = [members[i * len(members) // min(sample, len(members))] for i in range(min(sample, len(members)))]
    widths, heights = [], []
    for tar, offset, size in chosen:
        raw = store.read_bytes(tar, offset=offset, length=size)
        try:
            with Image.open(io.BytesIO(raw)) as image:
                widths.append(image.width)
                heights.append(image.height)
        except Exception as err:
            raise ValueError(f"{store.url(tar)}: the JPEG at byte {offset} has an unreadable header ({err})") from err
    sizes = [size for _, _, size in members]
    return {
        "shards_dir": store.resolved(),
        "split": split,
        "images": manifest.num_samples,
        "num_classes": manifest.num_classes,
        "shards": len(manifest.shards),
        "total_gb": sum(s.bytes for s in manifest.shards) / 1e9,
        "mean_jpeg_kb": statistics.fmean(sizes) / 1e3,
        "mean_width_px": statistics.fmean(widths),
        "mean_height_px": statistics.fmean(heights),
        "mean_megapixels": statistics.fmean(w * h for w, h in zip(widths, heights, strict=True)) / 1e6,
        "resolution_sample": len(chosen),
    }


def describe_machine() -> dict:
    """What makes figures from two machines comparable or not: GPU, driver, CPU, library versions."""
    import PIL
    import torch
    from PIL import features

    from training.tuning import machine_key

    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    driver = None
    if torch.cuda.is_available():
        try:
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
        except Exception:  # NVML missing: the driver stays n/a rather than failing the profile
            driver = None
    key = machine_key()
    return {
        "gpu": key["gpu"],
        "gpu_count": key["gpu_count"],
        "driver": driver,
        "cuda": torch.version.cuda,
        "cpu": key["cpu"],
        "cpu_count": os.cpu_count(),
        "cpu_usable": key["cpu_usable"],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dali": dali_version,
        "pillow": PIL.__version__,
        # Pillow-SIMD publishes versions like 9.0.0.post1; libjpeg-turbo is what makes plain Pillow decode fast
        "pillow_simd": ".post" in PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
    }
