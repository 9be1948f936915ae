"""The report: report.json (every figure, null where not measurable), report.md (corpus, machine, the table)
and report.png (tools/profiler/plot.py).

An unstable row (tools/profiler/row.py) keeps its figures in parentheses and says why in its note:
it is shown, never presented as a result.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.profiler.plan import AXES, LOADER_AXES, STEP_AXES
from tools.profiler.row import ProfileRow

NA = "n/a"
LEGEND = ("img/s/GPU: median over timed windows (min-max beside it). data wait: share of the e2e wall time the "
          "step loop spent in next(loader). CPU cores: CPU seconds of this process and its workers per wall second. "
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
        head = ["mode", "backend", *(AXES[name].column or name for name in loader), "batch", "px",
                *(AXES[name].column or name for name in step), *(["model threads"] if cpu_model else []),
                "img/s/GPU", "min-max",
                *(["total", "alone", "scaling"] if node else []),
                "step ms", "data wait", "CPU cores", "GPU util", "GPU mem GiB", "vs ceiling", "vs pytorch",
                "threads needed", "note"]
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

    def write(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write report.json, report.md and report.png into `out_dir` (created); returns their paths."""
        from shards.process import atomic_write
        from tools.profiler.plot import plot_report

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "png": out_dir / "report.png"}
        atomic_write(paths["json"], json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        atomic_write(paths["md"], self.to_markdown())
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
