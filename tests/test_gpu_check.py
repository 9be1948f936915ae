"""tools/gpu_check.py, the H100 check in one call: its stages, and the goal summary it reads from the reports.
(The whole check ran here with --cpu-dry-run; on the GPU machine it runs for real.)"""

from __future__ import annotations

import json
from pathlib import Path

from tools import gpu_check
from tools.gpu_check import Plan, goals, main, stage_commands


def write_report(path: Path, rows: list[dict]) -> None:
    path.mkdir(parents=True)
    (path / "report.json").write_text(json.dumps({"rows": rows}))


def test_stages_are_the_issue_s_measurements(tmp_path):
    plan = Plan.for_machine(cpu_dry_run=False)
    loader = stage_commands("loader", plan, work=tmp_path, out=tmp_path / "out")
    assert "--threads" in loader[0] and loader[0][loader[0].index("--threads") + 1] == "2,4,8,16"
    assert loader[0][loader[0].index("--hw-decoder-load") + 1] == "0,0.65,1"
    assert loader[1][loader[1].index("--backends") + 1] == "dali-gpu,dali-cpu,pytorch"
    e2e = stage_commands("e2e", plan, work=tmp_path, out=tmp_path / "out")
    assert e2e[0][e2e[0].index("--compile") + 1] == "off,on" and e2e[0][e2e[0].index("--threads") + 1] == "4"
    assert all(cmd[cmd.index("--batch-size") + 1] == "256" for cmd in loader + e2e)
    tests = stage_commands("tests", plan, work=tmp_path, out=tmp_path / "out")[0]
    assert tests[1:5] == ["-m", "pytest", "-m", "gpu"]


def test_goals_read_the_reports(tmp_path):
    plan = Plan.for_machine(cpu_dry_run=False)
    out = tmp_path / "out"
    write_report(out / "loader" / "sweep", [
        {"threads": 16, "images_per_sec_per_gpu": 31000.0, "error": None},
        {"threads": 16, "images_per_sec_per_gpu": 29000.0, "error": None},
        {"threads": 2, "images_per_sec_per_gpu": 7000.0, "error": None, "unstable": ["spread"]},
    ])
    write_report(out / "loader" / "vs-pytorch", [{"backend": "dali-gpu", "vs_pytorch": 5.5, "error": None}])
    write_report(out / "e2e" / "dali", [
        {"mode": "model", "compile": True, "images_per_sec_per_gpu": 6100.0, "error": None},
        {"mode": "e2e", "compile": True, "vs_ceiling": 0.991, "error": None},
    ])
    assert [measured for _, _, measured in goals(out, plan)] == [
        "31,000 img/s", "5.50x", "(7,000 img/s, unstable)", "6,100 img/s", "0.991"]
    assert [measured for _, _, measured in goals(tmp_path / "empty", plan)] == ["not measured"] * 5


def test_kept_corpus_is_not_made_again_and_bad_stages_are_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "work" / "imagenet").mkdir(parents=True)
    (tmp_path / "work" / "imagenet" / "synth.json").write_text("{}")
    ran = []
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda cmd, **kw: ran.append(cmd))
    assert main([str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--stages", "corpus"]) == 0
    assert ran == [] and "| corpus | kept | 0 |" in (tmp_path / "out" / "summary.md").read_text()
    assert main([str(tmp_path / "out"), "--stages", "corpus,warp"]) == 2
    assert "--stages: unknown ['warp']" in capsys.readouterr().err
