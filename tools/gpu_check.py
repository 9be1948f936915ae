"""The GPU check in one call, most important figures first: corpus -> shards -> the dali-gpu loader beside pytorch
-> the ResNet-50 ceiling and dali-gpu end to end -> `pytest -m gpu` -> the rest (data orders, policies, the full
loader sweep, object storage). Every report lands under one folder, each row as soon as it is measured, and a
summary of the goals after each stage, so a call cut at its time limit still returns what it measured.

    python3 -m tools.gpu_check $OUT --budget 480          # on the GPU machine (H100 or H200), repo root
    python3 -m tools.gpu_check $OUT --stages tests,order  # a later call while the machine is warm
    python3 -m tools.gpu_check out --cpu-dry-run          # here: the same stages on dali-cpu, tiny, to test it

## The recipe: 15 minutes of machine time (docs/benchmarks.md records the time each step took)
The machine is lent for 15 minutes in all (start, every call, idle waits and the hand-back), and is gone 30 s
after the last call. Plan one start:
1. Here, before asking for the machine: `bash ../shared/gpu/pack-dali.sh` (DALI 2.4 and webdataset in 4 chunks
   under .dali/, about 8 minutes once; cached after).
2. Start + carry, 4 calls back to back (~3 minutes): `carry [".dali/c0"]` `mkdir -p /tmp/dl && mv .dali/c0/*
   /tmp/dl/`, the same for c1 and c2, then the last chunk in the measuring call itself.
3. One measuring call with a timeout of about 540 s (the call limit is 600 s): `carry [".dali/c3"]`,
   `mv .dali/c3/* /tmp/dl/ && mkdir -p /tmp/site && cat /tmp/dl/part* | xz -dc | tar -C /tmp/site -xf - &&
   export PYTHONPATH=/tmp/site:$PWD && python3 -m tools.gpu_check $OUT --budget 480`. Budget: corpus and shards
   ~40 s, loader ~100 s, ceiling (compiled when at least COMPILE_BUDGET seconds are left, else eager: the summary
   says which) and end to end ~150 s, tests ~100 s; the rest fills what is left, and what does not fit is
   listed as not run.
4. give_back at once unless a second call follows within 30 s (`--stages` picks up where the first one stopped;
   the corpus and shards stay in --work while the machine is warm).

Stages (`--stages`, in this order): `corpus` (`saturate synth`, ImageNet-shaped, ~110 KB at ~400x350),
`convert`, `loader` (dali-gpu at 4 and 16 threads x hw_decoder_load 0.65 and 1.0, pytorch at 4 and 16 workers,
one run: the ratios come from it), `ceiling` (ResNet-50 bf16 channels_last on synthetic input, and fed by
dali-gpu at 4 threads), `tests` (`pytest -m gpu`), `order` (dali-gpu at 16 threads in `sample` and `shard`
order), `augment` (every policy, loader alone, dali-gpu and pytorch), `sweep` (dali-gpu at 2 and 8 threads,
hw_decoder_load 0, and pytorch end to end), `s3` (the val shards from disk and from a local S3 server,
tools/local_s3.py; skipped when the machine lacks boto3 and moto, which the GPU image does not have: carry them
like DALI, e.g. `pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d extras
boto3 moto flask flask-cors werkzeug xmltodict responses` into a chunk). OUT/<stage>/ holds each stage's reports,
OUT/<stage>.log its output, OUT/summary.md each stage's status and time and the goals against the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STAGES = ("corpus", "convert", "loader", "ceiling", "tests", "order", "augment", "sweep", "s3")
#: The performance goals (images/s per GPU, 224 px, batch 256) the summary compares the figures with.
GOALS = {
    "loader_16_threads": 30_000,
    "loader_vs_pytorch": 5.0,
    "loader_2_threads": 6_000,
    "ceiling_compiled": 6_000,
    "e2e_of_ceiling": 0.98,
}
#: Seconds the check must have left when the ceiling stage starts to compile the model (torch.compile of a
#: ResNet-50 takes one to two minutes on the first call); with less it measures the eager model and says so.
COMPILE_BUDGET = 300.0


@dataclass(frozen=True)
class Plan:
    """Sizes and backends of one check: the real one, or a tiny CPU dry run of the same stages."""

    gpu_backend: str
    classes: int
    train_per_class: int
    val_per_class: int
    batch: int
    image_size: int
    arch: str
    precision: str
    first_threads: tuple[int, ...]  # the loader stage's thread counts: 4 and 16
    more_threads: tuple[int, ...]  # the sweep stage's: 2 and 8
    many_threads: int  # the "16 threads" of the goals
    few_threads: int  # the "<= 4 threads" of the end-to-end goal
    hw_loads: tuple[float, ...]  # the loader stage's decoder shares
    duration: float  # timed seconds per configuration
    compile_model: bool  # torch.compile in the ceiling stage when the budget allows it

    @staticmethod
    def for_machine(cpu_dry_run: bool) -> Plan:
        if cpu_dry_run:
            return Plan("dali-cpu", 4, 24, 12, 16, 64, "resnet18", "fp32", (1, 2), (1,), 2, 1, (0.65,), 0.5, False)
        return Plan("dali-gpu", 100, 200, 10, 256, 224, "resnet50", "bf16", (4, 16), (2, 8), 16, 4, (0.65, 1.0),
                    4.0, True)


def cli(*args: str) -> list[str]:
    """The `saturate` command line of this checkout (the GPU machine has no installed entry point)."""
    return [sys.executable, "-m", "tools.cli", *args]


def profile_args(plan: Plan, shards: Path, out: Path, *extra: str) -> list[str]:
    return cli("profile", str(shards), "--out", str(out), "--batch-size", str(plan.batch), "--image-size",
               str(plan.image_size), "--arch", plan.arch, "--precision", plan.precision, "--duration",
               str(plan.duration), "--windows", "2" if plan.duration < 2 else "4", "--warmup", "3",
               "--max-warmup", str(4 * plan.duration), "--no-progress", *extra)


def stage_commands(stage: str, plan: Plan, *, work: Path, out: Path, compile_model: bool = True) -> list[list[str]]:
    """The commands of one stage (run in order; the stage fails at the first that fails). compile_model: the
    ceiling stage compiles the model (the caller decides from the budget left, and the plan)."""
    corpus, shards = work / "imagenet", work / "shards"
    few, many = str(plan.few_threads), str(plan.many_threads)
    if stage == "corpus":
        return [cli("synth", str(corpus), "--classes", str(plan.classes), "--train-per-class",
                    str(plan.train_per_class), "--val-per-class", str(plan.val_per_class), "--seed", "0",
                    "--overwrite", "--no-progress")]
    if stage == "convert":
        # --check header when simplejpeg is missing (a machine assembled by hand): the corpus is our own
        check = [] if _importable("simplejpeg") else ["--check", "header"]
        return [cli("shards", "convert", str(corpus / split), str(shards), "--split", split, "--shard-size",
                    "128MB", "--no-progress", *check) for split in ("train", "val")]
    if stage == "tests":
        return [[sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests",
                 "--junitxml", str(out / "tests" / "junit.xml")]]
    gpu = plan.gpu_backend
    if stage == "loader":
        return [profile_args(plan, shards, out / "loader", "--modes", "loader", "--backends", f"{gpu},pytorch",
                             "--threads", ",".join(map(str, plan.first_threads)),
                             "--hw-decoder-load", ",".join(f"{x:g}" for x in plan.hw_loads))]
    if stage == "ceiling":
        return [profile_args(plan, shards, out / "ceiling", "--modes", "model,e2e", "--backends", gpu, "--threads",
                             few, "--compile", "on" if compile_model else "off")]
    if stage == "order":
        return [profile_args(plan, shards, out / "order", "--modes", "loader", "--backends", gpu, "--threads", many,
                             "--order", "sample,shard")]
    if stage == "augment":
        return [profile_args(plan, shards, out / "augment", "--modes", "loader", "--backends", f"{gpu},pytorch",
                             "--threads", many, "--augment", "rrc-flip,autoaugment,randaugment,trivialaugment")]
    if stage == "sweep":
        return [
            profile_args(plan, shards, out / "sweep" / "loader", "--modes", "loader", "--backends", gpu, "--threads",
                         ",".join(map(str, plan.more_threads)), "--hw-decoder-load", "0"),
            profile_args(plan, shards, out / "sweep" / "pytorch-e2e", "--modes", "model,e2e", "--backends",
                         "pytorch", "--threads", many),
        ]
    if stage == "s3":
        # the val split's shards (smaller: moto reads a whole object per ranged GET) served from a local S3
        # server, loader alone, next to the same shards on disk in one run each
        local = profile_args(plan, shards, out / "s3" / "disk", "--modes", "loader", "--backends",
                             f"{gpu},pytorch", "--threads", many, "--split", "val")
        store = profile_args(plan, Path("{url}"), out / "s3" / "store", "--modes", "loader", "--backends",
                             f"{gpu},pytorch", "--threads", many, "--split", "val")
        return [local, [sys.executable, "-m", "tools.local_s3", str(shards), "--", *store]]
    raise ValueError(f"--stages: unknown stage {stage!r}; choose from {', '.join(STAGES)}")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def done_already(stage: str, work: Path) -> bool:
    """The corpus and the shards survive between calls in --work: a later call does not make them again."""
    if stage == "corpus":
        return (work / "imagenet" / "synth.json").is_file()
    if stage == "convert":
        return all((work / "shards" / f"{s}.manifest.json").is_file() for s in ("train", "val"))
    return False


def run_stage(stage: str, plan: Plan, *, work: Path, out: Path, timeout: float) -> dict:
    """Run one stage's commands with a time limit, output to OUT/<stage>.log; returns its status record (the
    ceiling stage's says whether the model was compiled)."""
    if done_already(stage, work):
        return {"stage": stage, "status": "kept", "seconds": 0.0}
    if stage == "s3" and not (_importable("boto3") and _importable("moto")):
        return {"stage": stage, "status": "skipped: boto3/moto not on this machine", "seconds": 0.0}
    (out / stage).mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    status = "ok"
    compile_model = plan.compile_model and timeout >= COMPILE_BUDGET
    with open(out / f"{stage}.log", "w") as log:
        for command in stage_commands(stage, plan, work=work, out=out, compile_model=compile_model):
            left = timeout - (time.monotonic() - start)
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            try:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=max(left, 1)).returncode
            except subprocess.TimeoutExpired:
                status = f"timed out after {timeout:.0f} s"
                break
            if code != 0:
                status = f"failed (exit {code}, see {stage}.log)"
                break
    if stage == "ceiling":
        status += " (compiled)" if compile_model else (" (eager: less than the compile budget was left)"
                                                        if plan.compile_model else " (eager)")
    return {"stage": stage, "status": status, "seconds": time.monotonic() - start}


def rows(report: Path) -> list[dict]:
    return json.loads(report.read_text())["rows"] if report.is_file() else []


def goals(out: Path, plan: Plan) -> list[tuple[str, str, str]]:
    """(goal, target, measured) for each of the issue's goals that the reports hold figures for."""
    found: list[tuple[str, str, str]] = []

    def figure(rows_: list[dict], **match) -> dict | None:
        return next((r for r in rows_ if r.get("error") is None and all(r.get(k) == v for k, v in match.items())),
                    None)

    def text(row: dict | None, key: str, spec: str) -> str:
        if row is None or row.get(key) is None:
            return "not measured"
        value = spec.format(row[key])
        return f"({value}, unstable)" if row.get("unstable") else value

    gpu = plan.gpu_backend
    loader = rows(out / "loader" / "report.json")
    best = max((r for r in loader if r.get("error") is None and r.get("backend") == gpu
                and r.get("threads") == plan.many_threads), key=lambda r: r["images_per_sec_per_gpu"], default=None)
    found.append((f"{gpu} loader, {plan.many_threads} threads", f">= {GOALS['loader_16_threads']:,} img/s",
                  text(best, "images_per_sec_per_gpu", "{:,.0f} img/s")))
    found.append((f"{gpu} loader vs pytorch, {plan.many_threads} threads, same run",
                  f">= {GOALS['loader_vs_pytorch']:g}x", text(best, "vs_pytorch", "{:.2f}x")))
    sweep = rows(out / "sweep" / "loader" / "report.json")
    two = max((r for r in sweep if r.get("error") is None and r.get("threads") == min(plan.more_threads)),
              key=lambda r: r["images_per_sec_per_gpu"], default=None)
    found.append((f"{gpu} loader, {min(plan.more_threads)} threads", f">= {GOALS['loader_2_threads']:,} img/s",
                  text(two, "images_per_sec_per_gpu", "{:,.0f} img/s")))
    ceiling = rows(out / "ceiling" / "report.json")
    model = figure(ceiling, mode="model")
    compiled = "compiled" if model is not None and model.get("compile") else "eager"
    found.append((f"{plan.arch} ceiling ({compiled if model else 'compiled if it fits'})",
                  f">= {GOALS['ceiling_compiled']:,} img/s compiled", text(model, "images_per_sec_per_gpu",
                                                                          "{:,.0f} img/s")))
    found.append((f"{gpu} end to end at {plan.few_threads} threads / ceiling", f">= {GOALS['e2e_of_ceiling']:g}",
                  text(figure(ceiling, mode="e2e"), "vs_ceiling", "{:.3f}")))
    return found


def summary(out: Path, plan: Plan, stages: list[dict]) -> str:
    lines = ["# GPU check", "", "| stage | status | s |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']:.0f} |" for s in stages]
    lines += ["", "| goal | target | measured |", "|---|---|---|"]
    lines += [f"| {goal} | {target} | {measured} |" for goal, target, measured in goals(out, plan)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tools.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for every report, log and summary.md (the device tool's $OUT)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list, in order (default: all: "
                        f"{','.join(STAGES)})")
    parser.add_argument("--work", default="/tmp/gpu-check", help="corpus and shards (kept for later calls)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all stages (default 480: the "
                        "recipe's one call, see above)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes and dali-cpu: test the plumbing")
    parser.add_argument("--fresh", action="store_true", help="make the corpus and shards again")
    args = parser.parse_args(argv)
    plan = Plan.for_machine(args.cpu_dry_run)
    out, work = Path(args.out), Path(args.work)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        print(f"gpu_check: error: --stages: unknown {unknown}; choose from {', '.join(STAGES)}", file=sys.stderr)
        return 2
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    records = []
    for stage in stages:
        left = deadline - time.monotonic()
        if left < 5:
            records.append({"stage": stage, "status": "not run: the budget was spent", "seconds": 0.0})
            continue
        records.append(run_stage(stage, plan, work=work, out=out, timeout=left))
        print(f"gpu_check: {stage}: {records[-1]['status']} ({records[-1]['seconds']:.0f} s)", flush=True)
        (out / "summary.md").write_text(summary(out, plan, records))  # written after each stage: a cut call keeps it
    text = summary(out, plan, records)
    (out / "summary.md").write_text(text)
    print(text)
    return 0 if all(r["status"] in ("ok", "kept") or r["status"].startswith("skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
