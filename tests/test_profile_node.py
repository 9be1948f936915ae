"""Node scale on the CPU: `saturate profile --nproc 2` launches two gloo processes under torchrun; both measure
each configuration together (rank 0 also alone), and rank 0 alone writes the report with per-rank figures,
their mean and total, and the scaling against one process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def node_profile(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("node") / "prof"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run(
        [sys.executable, "-m", "tools.cli", "profile", str(tiny_shards), "--out", str(out), "--nproc", "2",
         "--modes", "model,e2e", "--backends", "dali-cpu", "--threads", "1", "--arch", "resnet18",
         "--batch-size", "8", "--image-size", "32", "--precision", "fp32", "--steps", "4", "--windows", "2",
         "--warmup", "1", "--max-warmup", "0", "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, out


def test_every_rank_measures_and_rank_0_reports(node_profile):
    printed, out = node_profile
    body = json.loads((out / "report.json").read_text())
    assert body["settings"]["ranks"] == 2
    assert [(row["mode"], row["ranks"]) for row in body["rows"]] == [("model", 2), ("e2e", 2)]
    for row in body["rows"]:
        assert row["error"] is None, row["error"]
        per_rank = row["per_rank_images_per_sec"]
        assert len(per_rank) == 2 and all(math.isfinite(v) and v > 0 for v in per_rank)
        assert row["images_per_sec_per_gpu"] == pytest.approx(sum(per_rank) / 2)
        assert row["images_per_sec_total"] == pytest.approx(sum(per_rank))
        assert (row["images_per_sec_min"], row["images_per_sec_max"]) == (min(per_rank), max(per_rank))
        assert row["solo_images_per_sec"] > 0
        assert row["scaling_efficiency"] == pytest.approx(row["images_per_sec_per_gpu"] / row["solo_images_per_sec"])
        assert row["timed_steps"] == 2 * 4 * (2 if row["mode"] == "model" else 1)  # 2 ranks x 4 steps x passes
    # one report, written once; the table has the node columns and the per-rank table follows
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "report.png"]
    assert printed.count("| mode | backend |") == 1 and "| total | alone | scaling |" in printed
    assert "| configuration | rank 0 | rank 1 | alone |" in printed
    assert "note: 2 ranks (2 per node) measured each configuration together; rank 0 also measured it alone" in printed
    assert "## Per rank (images/s per GPU)" in (out / "report.md").read_text()
