"""tools/gpu_check.py, the GPU check in one call: its stages in the order the issue asks for, and the goal summary
it reads from the reports. (The whole check ran here with --cpu-dry-run; on the GPU machine it runs for real.)"""

from __future__ import annotations

import json
from pathlib import Path

from tools import gpu_check
from tools.gpu_check import Plan, goals, main, stage_commands


def write_report(path: Path, rows: list[dict]) -> None:
    path.mkdir(parents=True)
    (path / "report.json").write_text(json.dumps({"rows": rows}))


def test_stages_are_the_issue_s_measurements_most_important_first(tmp_path):
    assert gpu_check.STAGES[:5] == ("corpus", "convert", "loader", "ceiling", "tests")
    plan = Plan.for_machine(cpu_dry_run=False)
    out = tmp_path / "out"
    (loader,) = stage_commands("loader", plan, work=tmp_path, out=out)
    assert loader[loader.index("--threads") + 1] == "4,16"
    assert loader[loader.index("--hw-decoder-load") + 1] == "0.65,1"
    assert loader[loader.index("--backends") + 1] == "dali-gpu,pytorch"  # one run: the ratio to pytorch
    (ceiling,) = stage_commands("ceiling", plan, work=tmp_path, out=out)
    assert ceiling[ceiling.index("--compile") + 1] == "on" and ceiling[ceiling.index("--threads") + 1] == "4"
    assert ceiling[ceiling.index("--modes") + 1] == "model,e2e" and "bf16" in ceiling and "resnet50" in ceiling
    (eager,) = stage_commands("ceiling", plan, work=tmp_path, out=out, compile_model=False)
    assert eager[eager.index("--compile") + 1] == "off"
    (order,) = stage_commands("order", plan, work=tmp_path, out=out)
    assert order[order.index("--order") + 1] == "sample,shard" and order[order.index("--threads") + 1] == "16"
    sweep = stage_commands("sweep", plan, work=tmp_path, out=out)
    assert sweep[0][sweep[0].index("--threads") + 1] == "2,8"
    assert all(cmd[cmd.index("--batch-size") + 1] == "256" for cmd in [loader, ceiling, order, *sweep])
    tests = stage_commands("tests", plan, work=tmp_path, out=out)[0]
    assert tests[1:5] == ["-m", "pytest", "-m", "gpu"]


def test_the_ceiling_compiles_only_when_the_budget_allows(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda cmd, **kw: ran.append(cmd) or
                        type("Done", (), {"returncode": 0})())
    plan = Plan.for_machine(cpu_dry_run=False)
    roomy = gpu_check.run_stage("ceiling", plan, work=tmp_path, out=tmp_path, timeout=gpu_check.COMPILE_BUDGET)
    tight = gpu_check.run_stage("ceiling", plan, work=tmp_path, out=tmp_path, timeout=gpu_check.COMPILE_BUDGET - 1)
    assert [cmd[cmd.index("--compile") + 1] for cmd in ran] == ["on", "off"]
    assert roomy["status"] == "ok (compiled)"
    assert tight["status"] == "ok (eager: less than the compile budget was left)"


def test_goals_read_the_reports(tmp_path):
    plan = Plan.for_machine(cpu_dry_run=False)
    out = tmp_path / "out"
    write_report(out / "loader", [
        {"backend": "dali-gpu", "threads": 16, "images_per_sec_per_gpu": 31000.0, "vs_pytorch": 5.5, "error": None},
        {"backend": "dali-gpu", "threads": 16, "images_per_sec_per_gpu": 29000.0, "vs_pytorch": 5.1, "error": None},
        {"backend": "pytorch", "threads": 16, "images_per_sec_per_gpu": 5600.0, "error": None},
    ])
    write_report(out / "sweep" / "loader", [
        {"threads": 2, "images_per_sec_per_gpu": 7000.0, "error": None, "unstable": ["spread"]}])
    write_report(out / "ceiling", [
        {"mode": "model", "compile": True, "images_per_sec_per_gpu": 6100.0, "error": None},
        {"mode": "e2e", "compile": True, "vs_ceiling": 0.991, "error": None},
    ])
    found = goals(out, plan)
    assert [measured for _, _, measured in found] == [
        "31,000 img/s", "5.50x", "(7,000 img/s, unstable)", "6,100 img/s", "0.991"]
    assert found[3][0] == "resnet50 ceiling (compiled)"
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
