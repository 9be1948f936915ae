"""`saturate profile` end to end: the corpus description, a full CPU profile on tiny shards (loader, model and
e2e; dali-cpu and pytorch; a thread sweep), broken backends as error rows, and the CLI. The parts alone:
tests/test_profile_parts.py (plan, measure, stability, report), test_profile_gpu.py, test_profile_tune.py,
test_profile_node.py."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from PIL import Image

from tools import profiler
from tools.cli import main as cli_main
from tools.profiler.measure import cpu_split
from tools.profiler.report import describe_corpus

# tiny_imagenet's train split (tests/conftest.py): 5 classes x 12 images, 8 samples per shard
TRAIN_IMAGES, TRAIN_CLASSES, TRAIN_SHARDS = 60, 5, 8
#: The smallest training setup that still runs the real TrainStep: a few seconds per configuration on 2 cores.
TINY = dict(arch="resnet18", batch_sizes=(8,), image_sizes=(32,), precisions=("bf16",), compile_modes=(False,),
            steps=2, warmup=1, windows=2, max_warmup=0.0, progress=False)
#: Bounded by time instead: each window lasts at least 0.15 s (at least one step), long enough for process
#: CPU time, which the kernel counts in 10 ms ticks, to give a figure for the fast loader-only rows.
TINY_TIMED = {**TINY, "steps": None, "duration": 0.3}
MEASURED = ("images_per_sec_per_gpu", "images_per_sec_min", "images_per_sec_max", "step_time_ms",
            "cpu_cores_busy", "timed_seconds")
GPU_FIGURES = ("gpu_util_pct", "gpu_memory_peak_gib", "gpu_memory_used_gib")
#: These check what a machine without a GPU reports (dali-gpu fails, GPU figures are null); the gpu test
#: covers a CUDA machine.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the figures of a machine without a GPU")


def config_key(row: dict) -> tuple:
    return (row["mode"], row["backend"], row["threads"], row["hw_decoder_load"], row["precision"], row["compile"],
            row["model_threads"])


#: loader threads -> the model's CPU threads (the trainer's split of the cores); None leaves them to OMP_NUM_THREADS
SPLIT = cpu_split(torch.device("cpu")) or (lambda threads: None)


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# --- the corpus ---------------------------------------------------------------------------------------------
def test_describe_corpus_reads_indexes_and_jpeg_headers(tiny_shards, tiny_imagenet):
    corpus = describe_corpus(tiny_shards, "train")
    sources = sorted((tiny_imagenet / "train").glob("*/*.JPEG"))
    sizes = [Image.open(path).size for path in sources]
    assert corpus["images"] == TRAIN_IMAGES and corpus["num_classes"] == TRAIN_CLASSES
    assert corpus["shards"] == TRAIN_SHARDS and corpus["resolution_sample"] == TRAIN_IMAGES
    # the converter keeps RGB JPEG bytes untouched, so the indexed sizes are the source files' sizes
    assert corpus["mean_jpeg_kb"] == pytest.approx(statistics.fmean(p.stat().st_size for p in sources) / 1e3)
    assert corpus["mean_width_px"] == pytest.approx(statistics.fmean(w for w, _ in sizes))
    assert corpus["mean_height_px"] == pytest.approx(statistics.fmean(h for _, h in sizes))
    sampled = describe_corpus(tiny_shards, "train", sample=7)
    assert sampled["resolution_sample"] == 7 and sampled["mean_jpeg_kb"] == corpus["mean_jpeg_kb"]


# --- a whole profile on the CPU -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_profile(tiny_shards, tmp_path_factory):
    """loader + model + e2e over dali-cpu, pytorch and dali-gpu (which cannot run here), threads 1 and 2."""
    out = tmp_path_factory.mktemp("profile")
    report = profiler.profile(tiny_shards, out_dir=out, modes=("loader", "model", "e2e"),
                              backends=("dali-cpu", "pytorch", "dali-gpu"), threads=(1, 2), **TINY_TIMED)
    return report, out


@cpu_only
def test_profile_writes_every_configuration_asked_for(cpu_profile):
    report, out = cpu_profile
    body = json.loads((out / "report.json").read_text())
    data = [(b, t) for b in ("dali-cpu", "pytorch", "dali-gpu") for t in (1, 2)]
    # on the CPU the model is measured at every thread count an e2e row leaves it, and at the whole share
    expected = {("model", "synthetic", None, None, "bf16", False, n) for n in {SPLIT(0), SPLIT(1), SPLIT(2)}}
    expected |= {("loader", b, t, 0.65 if b == "dali-gpu" else None, None, None, None) for b, t in data}
    expected |= {("e2e", b, t, 0.65 if b == "dali-gpu" else None, "bf16", False, SPLIT(t)) for b, t in data}
    assert len(body["rows"]) == len(expected) == 12 + len({SPLIT(0), SPLIT(1), SPLIT(2)})
    assert {config_key(row) for row in body["rows"]} == expected
    assert all(row["batch_size"] == 8 and row["image_size"] == 32 for row in body["rows"])
    assert body["settings"]["configurations"] == len(expected) and body["settings"]["arch"] == "resnet18"
    assert body["corpus"]["images"] == TRAIN_IMAGES
    assert body["machine"]["gpu"] is None and body["machine"]["cpu_count"] >= 1
    assert isinstance(body["machine"]["pillow_simd"], bool) and body["machine"]["torch"]


@cpu_only
def test_profile_figures_are_numbers_where_measurable_and_null_where_not(cpu_profile):
    report, out = cpu_profile
    rows = json.loads((out / "report.json").read_text())["rows"]
    ok = [row for row in rows if row["backend"] != "dali-gpu"]
    assert all(row["error"] is None for row in ok), [row["error"] for row in ok]
    for row in ok:
        for name in MEASURED:
            assert positive(row[name]), (row["label"], name, row[name])
        assert row["images_per_sec_min"] <= row["images_per_sec_per_gpu"] <= row["images_per_sec_max"]
        assert row["timed_steps"] >= 2  # one step per window at least
        for name in GPU_FIGURES:  # no GPU here: honest nulls, never zeros
            assert row[name] is None, (row["label"], name)
        assert positive(row["vs_ceiling"])
        # data wait is an e2e figure; threads needed a loader figure
        assert (row["data_wait_share"] is not None) == (row["mode"] == "e2e")
        assert (row["threads_needed"] is not None) == (row["mode"] == "loader")
        if row["mode"] == "e2e":
            assert 0.0 < row["data_wait_share"] < 1.0
        if row["mode"] == "loader":
            assert isinstance(row["threads_needed"], int) and row["threads_needed"] >= 1  # a count of threads
        # the ceiling is measured before and after the data rows; the steady check is off (max_warmup 0)
        assert len(row["passes"]) == (2 if row["mode"] == "model" else 1)
        assert row["settled"] is None and row["warmup_steps"] == len(row["passes"])
        assert row["is_unstable"] == bool(row["unstable"]) and isinstance(row["notes"], list)
        if row["mode"] != "model":
            assert positive(row["vs_pytorch"])
    ceilings = [row["vs_ceiling"] for row in ok if row["mode"] == "model"]  # one per model thread count
    assert max(ceilings) == 1.0 and all(0.0 < c <= 1.0 for c in ceilings)
    assert all(row["vs_pytorch"] == 1.0 for row in ok if row["backend"] == "pytorch")


@cpu_only
def test_profile_broken_backend_is_an_error_row(cpu_profile):
    report, out = cpu_profile
    broken = [row for row in report.rows if row.config.backend == "dali-gpu"]
    assert len(broken) == 4 and not any(row.ok for row in broken)
    assert all("CUDA" in row.error and row.images_per_sec_per_gpu is None for row in broken)
    table = (out / "report.md").read_text()
    assert table.count("| ERROR: RuntimeError:") == 4
    assert "## Corpus" in table and "## Machine" in table and report.table_markdown() in table


@cpu_only
def test_profile_png_is_a_picture(cpu_profile):
    _, out = cpu_profile
    with Image.open(out / "report.png") as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 300


def test_loader_that_raises_mid_epoch_is_an_error_row(tiny_shards, tmp_path, monkeypatch):
    import pipeline

    real_build_loader = pipeline.build_loader

    class Failing:
        """A pytorch loader that dies on its second batch, as a worker hitting a bad shard would."""

        def __init__(self, loader):
            self.loader, self.backend, self.num_classes = loader, loader.backend, loader.num_classes

        def __iter__(self):
            for n, batch in enumerate(self.loader):
                if n == 1:
                    raise OSError("worker 0: train-000003.tar: unexpected end of file")
                yield batch

        def close(self):
            self.loader.close()

    def build_loader(*args, backend, **kwargs):
        loader = real_build_loader(*args, backend=backend, **kwargs)
        return Failing(loader) if backend == "pytorch" else loader

    monkeypatch.setattr(pipeline, "build_loader", build_loader)
    report = profiler.profile(tiny_shards, out_dir=tmp_path, modes=("loader",), backends=("pytorch", "dali-cpu"),
                              threads=(1,), **TINY)
    by_backend = {row.config.backend: row for row in report.rows}
    assert set(by_backend) == {"pytorch", "dali-cpu"}
    assert by_backend["pytorch"].error == "OSError: worker 0: train-000003.tar: unexpected end of file"
    assert by_backend["dali-cpu"].ok and positive(by_backend["dali-cpu"].images_per_sec_per_gpu)
    assert by_backend["dali-cpu"].vs_pytorch is None  # no baseline to compare with
    assert by_backend["dali-cpu"].vs_ceiling is None  # no model mode asked for
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert [row["error"] is None for row in rows] == [False, True]


@cpu_only
def test_duration_bound_and_default_backends_without_a_gpu(tiny_shards):
    report = profiler.profile(tiny_shards, modes=("loader",), backends=None, threads=(1,), batch_sizes=(8,),
                              image_sizes=(32,), duration=0.2, warmup=1, windows=2, progress=False)
    assert report.settings["backends"] == ["dali-cpu", "pytorch"] and report.settings["steps"] is None
    assert report.notes[0] == "no CUDA GPU visible: profiling dali-cpu and pytorch instead of dali-gpu"
    assert [row.config.backend for row in report.rows] == ["dali-cpu", "pytorch"]
    assert all(row.ok and row.timed_steps >= 2 and positive(row.images_per_sec_per_gpu) for row in report.rows)


# --- the command line ---------------------------------------------------------------------------------------
def test_cli_prints_the_table_and_exits_zero(tiny_shards, tmp_path, capsys):
    out = tmp_path / "prof"
    status = cli_main(["profile", str(tiny_shards), "--out", str(out), "--modes", "loader",
                       "--backends", "dali-cpu,pytorch", "--threads", "1", "--batch-size", "8",
                       "--image-size", "32", "--steps", "2", "--warmup", "1", "--windows", "2", "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "| mode | backend | threads |" in printed
    assert printed.count("| loader | dali-cpu | 1 |") == 1 and printed.count("| loader | pytorch | 1 |") == 1
    assert f"corpus: {TRAIN_IMAGES} images, {TRAIN_CLASSES} classes" in printed
    if not torch.cuda.is_available():
        assert "note: no CUDA GPU: GPU utilisation and memory are n/a" in printed
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "report.png"]


@pytest.mark.parametrize("argv, message", [
    (["--threads", "2,x"], "--threads: '2,x' is not a comma list of int"),
    (["--threads", ","], "--threads: empty list"),
    (["--compile", "maybe"], "--compile"),
    (["--steps", "3", "--duration", "2"], "not allowed with argument"),
])
def test_cli_rejects_bad_flags(tiny_shards, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["profile", str(tiny_shards), "--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # one line: argparse's 15-line usage before it buried the flag
    assert err.count("\n") == 1 and err.startswith("saturate profile: error: argument ") and message in err
    assert err.endswith(" (see saturate profile --help)\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--arch", "resnet-9000"], "--arch: 'resnet-9000' is not a torchvision classification model"),
    (["--split", "test"], "test.manifest.json not found: convert the test split first"),  # any split name
    (["--split", "../val"], "--split '../val': a split name is letters, digits and '_'"),
    (["--backends", "synthetic"], "--backends: choose from dali-gpu, dali-cpu, pytorch"),
])
def test_cli_bad_values_are_one_line_errors(tiny_shards, tmp_path, capsys, argv, message):
    status = cli_main(["profile", str(tiny_shards), "--out", str(tmp_path), "--steps", "1", "--no-progress", *argv])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("tune", [[], ["--tune"]])
def test_an_out_that_cannot_be_written_is_found_before_measuring(tiny_shards, tmp_path, capsys, monkeypatch, tune):
    """A file in --out's place was found by the report's (or tune.json's) write, after every measurement, as
    '[Errno 17] File exists'."""
    from tools.profiler import sweep

    monkeypatch.setattr(sweep.Session, "measure", lambda *a: pytest.fail("measured before --out was checked"))
    out = tmp_path / "taken"
    out.write_text("a file")
    status = cli_main(["profile", str(tiny_shards), "--out", str(out), "--arch", "resnet18", "--backends", "pytorch",
                       "--steps", "1", "--no-progress", *tune])
    assert status == 2
    assert capsys.readouterr().err == f"saturate profile: error: --out {out}: cannot write there (File exists)\n"
    assert out.read_text() == "a file"


def test_nproc_relaunches_the_same_command_without_itself(tmp_path, capsys):
    from tools.profile_cmd import _without_nproc

    assert _without_nproc(["profile", "s", "--nproc", "8", "--out", "o"]) == ["profile", "s", "--out", "o"]
    assert _without_nproc(["profile", "s", "--nproc=8", "--tune"]) == ["profile", "s", "--tune"]
    status = cli_main(["profile", str(tmp_path), "--out", str(tmp_path / "out"), "--nproc", "0"])
    assert status == 2 and "--nproc: an integer >= 1, got 0" in capsys.readouterr().err


def test_cli_missing_shards_is_one_line_error(tmp_path, capsys):
    status = cli_main(["profile", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--modes", "loader",
                       "--backends", "pytorch", "--steps", "1", "--no-progress"])
    assert status == 2
    assert f"{tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


# --- on a GPU -----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_profile_measures_utilisation_and_memory(tiny_shards, tmp_path):
    report = profiler.profile(tiny_shards, out_dir=tmp_path, modes=("loader", "model", "e2e"),
                              backends=("dali-gpu", "pytorch"), threads=(2,), hw_decoder_loads=(0.0, 1.0), **TINY)
    assert len(report.rows) == 1 + 3 + 3
    assert all(row.ok for row in report.rows), [row.error for row in report.rows]
    for row in report.rows:
        assert positive(row.images_per_sec_per_gpu) and positive(row.gpu_memory_used_gib)
        assert row.gpu_util_pct is not None and 0.0 <= row.gpu_util_pct <= 100.0
    assert all(positive(row.gpu_memory_peak_gib) for row in report.rows if row.config.mode != "loader")
    assert Path(tmp_path / "report.png").stat().st_size > 0


def test_augment_is_a_sweep_axis_of_the_data_backends(tiny_shards, tmp_path, capsys):
    """What each policy costs the loader, per backend, side by side (the table that shows why DALI on the GPU)."""
    status = cli_main(["profile", str(tiny_shards), "--out", str(tmp_path), "--modes", "loader", "--backends",
                       "dali-cpu,pytorch", "--threads", "1", "--augment", "rrc-flip,trivialaugment",
                       "--random-erasing", "0.5", "--batch-size", "8", "--image-size", "32", "--steps", "2",
                       "--windows", "1", "--warmup", "1", "--max-warmup", "0", "--no-progress"])
    assert status == 0
    body = json.loads((tmp_path / "report.json").read_text())
    assert [(r["backend"], r["augment"]) for r in body["rows"]] == [
        ("dali-cpu", "rrc-flip"), ("dali-cpu", "trivialaugment"), ("pytorch", "rrc-flip"),
        ("pytorch", "trivialaugment")]
    assert all(r["error"] is None and positive(r["images_per_sec_per_gpu"]) for r in body["rows"])
    assert body["settings"]["augments"] == ["rrc-flip", "trivialaugment"]
    assert body["settings"]["random_erasing"] == 0.5
    assert "every row with an augment policy also has random_erasing=0.5" in body["notes"]
    table = capsys.readouterr().out
    assert "| augment |" in table and "| trivialaugment |" in table
    assert cli_main(["profile", str(tiny_shards), "--out", str(tmp_path), "--augment", "mixup", "--no-progress"]) == 2


def test_nproc_checks_out_and_tune_json_before_any_rank_starts(tmp_path, capsys, monkeypatch):
    """Raised in rank 0 alone, the other ranks would wait in a collective until torchrun gave up."""
    import tools.profiler.sweep as sweep

    launched = []
    monkeypatch.setattr(sweep, "launch", lambda nproc, argv: launched.append(argv) or 0)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert cli_main(["profile", str(tmp_path), "--out", str(blocked), "--nproc", "2"]) == 2
    assert f"--out {blocked}: cannot write there" in capsys.readouterr().err
    out = tmp_path / "out"
    out.mkdir()
    (out / "tune.json").write_text("{not json")
    assert cli_main(["profile", str(tmp_path), "--out", str(out), "--nproc", "2", "--tune"]) == 2
    assert f"{out / 'tune.json'}: not a tune file" in capsys.readouterr().err
    assert launched == []


def test_a_profile_cut_short_leaves_the_rows_it_measured(tiny_shards, tmp_path, monkeypatch):
    """A profile stopped by a time limit (the GPU machine's call ends) must still leave every row it measured:
    report.json and report.md are written after each configuration, marked partial until the end."""
    from tools.profiler import sweep as sweep_module

    real, calls = sweep_module.Session.measure, []

    def cut_at_the_second(self, config):
        calls.append(config)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what the call's time limit does
        return real(self, config)

    monkeypatch.setattr(sweep_module.Session, "measure", cut_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        profiler.profile(tiny_shards, out_dir=tmp_path / "prof", modes=("loader",), backends=("dali-cpu", "pytorch"),
                         threads=(1,), **TINY)
    report = json.loads((tmp_path / "prof" / "report.json").read_text())
    assert [(r["mode"], r["backend"]) for r in report["rows"]] == [("loader", "dali-cpu")]
    assert positive(report["rows"][0]["images_per_sec_per_gpu"])
    assert any(n.startswith("partial: 1 of 2 configurations") for n in report["notes"])
    assert "partial: 1 of 2" in (tmp_path / "prof" / "report.md").read_text()
    assert not (tmp_path / "prof" / "report.png").exists()
