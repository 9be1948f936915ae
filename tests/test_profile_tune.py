"""The tuner: its search on fake loaders whose rates are known (the cheapest saturating setting, the trial and
time budgets, the best reachable when nothing saturates), a real short tune on dali-cpu and pytorch, tune.json
and `saturate train --num-threads auto` reading it (or tuning first)."""

from __future__ import annotations

import json
import shutil

import pytest

from tools.cli import main as cli_main
from tools.profiler.measure import Timing
from tools.profiler.tune import NOISE, Setting, search, tune
from training import tuning
from training.config import ConfigError, build_config

CEILING = 1000.0  # images/s per GPU of the fake model


def fake_measure(per_thread):
    """e2e images/s of a fake loader: `per_thread(setting)` images/s per thread, capped by the ceiling."""
    seen = []

    def measure(setting: Setting):
        seen.append((setting.threads, setting.prefetch, setting.hw_decoder_load))
        return min(CEILING, setting.threads * per_thread(setting)), None, []
    return measure, seen


def test_search_finds_the_cheapest_saturating_setting():
    # 130 img/s per thread at prefetch 2, 150 at 3, 155 at 4: 8 threads feed it at prefetch 2, 7 at prefetch 3
    measure, seen = fake_measure(lambda s: {2: 130.0, 3: 150.0, 4: 155.0}[s.prefetch])
    result = search(backend="dali-cpu", ceiling=CEILING, measure=measure, max_threads=16)
    assert seen == [(1, 2, None), (2, 2, None), (4, 2, None), (8, 2, None),  # doubling until it feeds
                    (6, 2, None), (7, 2, None),  # bisecting down to the fewest threads at the default prefetch
                    (7, 3, None),  # one thread fewer with a deeper prefetch feeds it
                    (6, 3, None), (6, 4, None)]  # and one fewer again does not, whatever the prefetch
    assert (result.best.setting, result.reached, result.stopped) == (Setting(7, 3), True, None)
    assert result.best.fraction == 1.0 and [t.fraction for t in result.trials][:4] == [0.13, 0.26, 0.52, 1.0]


def test_search_tries_the_hardware_decoder_share_on_dali_gpu_and_honours_the_trial_budget():
    # the hardware decoder doing all JPEGs (load 1.0) makes each CPU thread worth 200 img/s instead of 130
    measure, seen = fake_measure(lambda s: 200.0 if s.hw_decoder_load == 1.0 else 130.0)
    result = search(backend="dali-gpu", ceiling=CEILING, measure=measure, max_threads=16, max_trials=12)
    assert seen[:10] == [(1, 2, 0.65), (2, 2, 0.65), (4, 2, 0.65), (8, 2, 0.65), (6, 2, 0.65), (7, 2, 0.65),
                         (7, 2, 0.75), (7, 2, 1.0), (6, 2, 1.0), (5, 2, 1.0)]
    assert len(seen) == 12 and result.stopped == "trial budget spent (12 trials)"
    assert (result.best.setting, result.reached) == (Setting(5, 2, 1.0), True)


def test_search_stops_at_the_time_budget_and_says_the_best_reachable():
    now = [0.0]

    def slow(setting: Setting):
        now[0] += 10.0  # every trial takes 10 s
        return setting.threads * 100.0, None, []

    result = search(backend="pytorch", ceiling=CEILING, measure=slow, max_threads=16, time_budget=25.0,
                    clock=lambda: now[0])
    # a third trial would end at 30 s > 25 s: it is not started
    assert [t.setting.threads for t in result.trials] == [1, 2]
    assert (result.reached, result.best.setting, result.stopped) == (False, Setting(2, 2), "time budget spent "
                                                                     "(20 of 25 s)")


def test_when_nothing_feeds_it_a_tie_within_noise_goes_to_the_cheaper_setting():
    measure, seen = fake_measure(lambda s: {2: 130.0, 4: 131.0}[s.prefetch])  # prefetch 4: +0.4 %, noise
    result = search(backend="pytorch", ceiling=CEILING, measure=measure, max_threads=4)
    assert seen == [(1, 2, None), (2, 2, None), (4, 2, None), (4, 4, None)]
    assert (result.reached, result.best.setting, result.best.fraction) == (False, Setting(4, 2), 0.52)


def test_search_when_no_setting_feeds_the_ceiling():
    measure, seen = fake_measure(lambda s: {2: 100.0, 4: 110.0}[s.prefetch])
    result = search(backend="pytorch", ceiling=CEILING, measure=measure, max_threads=4)
    assert seen == [(1, 2, None), (2, 2, None), (4, 2, None), (4, 4, None)]  # the other knob at the best count
    assert (result.reached, result.best.setting, result.best.fraction, result.stopped) == (
        False, Setting(4, 4), 0.44, None)


def test_a_failing_trial_is_recorded_not_fatal():
    def measure(setting: Setting):
        if setting.threads == 2:
            return None, "OSError: worker died", []
        return setting.threads * 500.0, None, []

    result = search(backend="pytorch", ceiling=CEILING, measure=measure, max_threads=4)
    died = "OSError: worker died"
    assert [(t.setting.threads, t.setting.prefetch, t.error) for t in result.trials] == [
        (1, 2, None), (2, 2, died), (4, 2, None), (3, 2, None), (2, 4, died)]
    assert result.best.setting == Setting(3, 2) and result.reached


# --- on real loaders ----------------------------------------------------------------------------------------
SHORT = dict(arch="resnet18", batch_size=8, image_size=32, precision="fp32", max_threads=2, max_trials=3,
             time_budget=120.0, progress=False,
             timing=Timing(steps=2, duration=None, windows=2, warmup=1, max_warmup=0.0))


@pytest.mark.parametrize("backend, deeper", [("dali-cpu", 3), ("pytorch", 4)])
def test_a_real_short_tune(tiny_shards, backend, deeper):
    entry = tune(tiny_shards, backend=backend, **SHORT)
    tried = [(t["threads"], t["prefetch"]) for t in entry["trials"]]
    assert all(t["error"] is None and t["images_per_sec_per_gpu"] > 0 for t in entry["trials"])
    if tried == [(1, 2)]:  # one thread fed the ceiling as the search measured it: nothing cheaper exists
        # (the ceiling measured again at the end may be higher on a busy machine: the verdict follows it)
        assert entry["setting"]["num_threads"] == 1
        assert entry["reached_target"] == (entry["fraction_of_ceiling"] >= entry["target"])
    else:  # 1 and 2 threads, then the other prefetch depth at the better count: 3 trials, the budget
        assert tried[:2] == [(1, 2), (2, 2)] and tried[2][1] == deeper and len(tried) == 3
    assert entry["ceiling_images_per_sec_per_gpu"] == max(
        entry["ceiling_before_images_per_sec_per_gpu"], entry["ceiling_after_images_per_sec_per_gpu"],
        *(t["images_per_sec_per_gpu"] for t in entry["trials"]))
    assert all(t["fraction"] <= 1.0 for t in entry["trials"])
    assert entry["match"] == tuning.match_key(arch="resnet18", batch_size=8, image_size=32, precision="fp32",
                                              compile=False, backend=backend, processes_per_node=1,
                                              machine=tuning.machine_key())
    if not entry["reached_target"]:  # not reached: the cheapest trial within noise of the best reachable
        top = max(t["fraction"] for t in entry["trials"])
        near = [t for t in entry["trials"] if t["fraction"] >= top - NOISE]
        cheapest = min(near, key=lambda t: (t["threads"], t["prefetch"]))
        assert (entry["setting"]["num_threads"], entry["setting"]["prefetch_depth"]) == (
            cheapest["threads"], cheapest["prefetch"])
        assert entry["fraction_of_ceiling"] == cheapest["fraction"]
    assert entry["flags"] == (f"--backend {backend} --num-threads {entry['setting']['num_threads']} "
                              f"--prefetch-depth {entry['setting']['prefetch_depth']}")


def test_profile_tune_writes_tune_json_and_train_auto_uses_it(tiny_shards, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    out = tmp_path / "tune"
    status = cli_main(["profile", str(shards), "--out", str(out), "--tune", "--backends", "dali-cpu",
                       "--arch", "resnet18", "--batch-size", "8", "--image-size", "32", "--precision", "fp32",
                       "--steps", "2", "--windows", "2", "--warmup", "1", "--max-warmup", "0", "--max-trials", "2",
                       "--max-threads", "2", "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 0
    written = json.loads((out / "tune.json").read_text())
    assert written == json.loads((shards / "tune.json").read_text())
    assert written["format"] == tuning.FORMAT and len(written["entries"]) == 1
    entry = written["entries"][0]
    assert f"wrote {out / 'tune.json'}" in printed and f"wrote {shards / 'tune.json'}" in printed
    assert f"train with: saturate train --data {shards} --arch resnet18 --batch-size 8 --image-size 32 " \
           f"--precision fp32 {entry['flags']}" in printed
    assert "| threads | prefetch | hw_load | img/s/GPU | of ceiling | s | note |" in printed

    run_dir = tmp_path / "run"
    status = cli_main(["train", "--data", str(shards), "--backend", "dali-cpu", "--arch", "resnet18",
                       "--batch-size", "8", "--image-size", "32", "--precision", "fp32", "--num-threads", "auto",
                       "--max-steps", "1", "--epochs", "1", "--run-dir", str(run_dir), "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 0
    chosen = f"--num-threads {entry['setting']['num_threads']}, --prefetch-depth {entry['setting']['prefetch_depth']}"
    assert f"loader 'auto': {chosen} (e2e {entry['fraction_of_ceiling']:.2f} of the ceiling" in printed
    assert f"from {shards / 'tune.json'}, tuned {entry['tuned_at']}" in printed
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["num_threads"], saved["prefetch_depth"]) == (entry["setting"]["num_threads"],
                                                                entry["setting"]["prefetch_depth"])


# --- resolving 'auto' ---------------------------------------------------------------------------------------
def auto_config(shards, **overrides):
    return build_config(overrides={**dict(data=str(shards), backend="dali-cpu", arch="resnet18", batch_size=8,
                                          image_size=32, precision="fp32", num_threads="auto"), **overrides})


def an_entry(cfg, *, threads=3, prefetch=4, load=None, reached=True):
    return {"match": tuning.run_key(cfg, world_size=1), "tuned_at": "2030-01-01T00:00:00+00:00",
            "setting": {"num_threads": threads, "prefetch_depth": prefetch, "hw_decoder_load": load},
            "reached_target": reached, "target": 0.98, "fraction_of_ceiling": 0.99 if reached else 0.6,
            "ceiling_images_per_sec_per_gpu": 1234.0, "trials": [{}, {}]}


def test_auto_reads_the_matching_entry_and_says_why(tiny_shards, tmp_path):
    cfg = auto_config(tiny_shards, tune_file=str(tmp_path / "tune.json"))
    other = auto_config(tiny_shards, batch_size=16)
    tuning.add_entry(tmp_path / "tune.json", an_entry(other, threads=9))  # another batch size: not ours
    tuning.add_entry(tmp_path / "tune.json", an_entry(cfg))
    said = []
    resolved = tuning.resolve_auto(cfg, world_size=1, is_main=True, say=said.append)
    assert (resolved.num_threads, resolved.prefetch_depth, resolved.hw_decoder_load) == (3, 4, None)
    assert said == [f"loader 'auto': --num-threads 3, --prefetch-depth 4 (e2e 0.99 of the ceiling 1234 img/s/GPU, "
                    f"the cheapest setting measured to reach 0.98); from {tmp_path / 'tune.json'}, tuned "
                    "2030-01-01T00:00:00+00:00"]
    # a prefetch depth given by the user stays; only 'auto' options change
    pinned = tuning.resolve_auto(auto_config(tiny_shards, tune_file=str(tmp_path / "tune.json"), prefetch_depth=2),
                                 world_size=1, is_main=True, say=said.append)
    assert (pinned.num_threads, pinned.prefetch_depth) == (3, 2)


def test_auto_without_a_match_tunes_first_or_says_what_to_run(tiny_shards, tmp_path):
    cfg = auto_config(tiny_shards, tune_file=str(tmp_path / "tune.json"), backend="pytorch",
                      hw_decoder_load="auto")
    with pytest.raises(ConfigError, match=r"--num-threads/--hw-decoder-load auto: no entry of .*tune.json matches "
                                          r"resnet18 batch 8 32px fp32 pytorch --augment rrc-flip, "
                                          r"1 process\(es\) per node"):
        tuning.resolve_auto(cfg, world_size=1, is_main=True, say=print)
    said = []
    resolved = tuning.resolve_auto(cfg, world_size=1, is_main=True, say=said.append,
                                   run_tune=lambda c: an_entry(c, threads=2, prefetch=2, reached=False))
    assert (resolved.num_threads, resolved.prefetch_depth, resolved.hw_decoder_load) == (2, 2, None)
    assert said[0].endswith("running a short tune first")
    assert said[1] == (f"loader 'auto': --num-threads 2, --prefetch-depth 2 (e2e 0.60 of "
                       "the ceiling 1234 img/s/GPU, the best reachable: no setting tried reached 0.98); from a short "
                       f"tune (2 trials); saved to {tmp_path / 'tune.json'}")
    assert tuning.find_entry(tmp_path / "tune.json", tuning.run_key(cfg, world_size=1))["setting"]["num_threads"] == 2


@pytest.mark.parametrize("flags, message", [
    (["--max-trials", "0"], "--max-trials: an integer >= 1, got 0"),
    (["--time-budget", "nan"], "--time-budget: seconds > 0, got nan"),
    (["--max-threads", "0"], "--max-threads: an integer >= 1 (loader threads per GPU), got 0"),
    (["--threads", "4"], "--threads: --tune searches the loader threads and prefetch depth itself"),
    (["--backends", "foo"], "--backends: choose from"),
    (["--duration", "inf"], "--duration: seconds > 0, got inf"),
    (["--warmup", "-1"], "--warmup: steps >= 0, got -1"),
    (["--target", "nan"], "--target: a fraction of the ceiling in (0, 1], got nan"),
])
def test_bad_tune_flags_are_one_line_and_write_nothing(tiny_shards, tmp_path, capsys, flags, message):
    """--tune took these unchecked: a KeyError traceback, 'no trial produced a figure', or a tune.json written
    from settings that were never asked for (--max-threads 0, --threads ignored)."""
    out = tmp_path / "prof"
    argv = ["profile", str(tiny_shards), "--out", str(out), "--tune", "--arch", "resnet18", "--batch-size", "2",
            "--image-size", "32", "--no-progress", *flags]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


@pytest.mark.parametrize("where", ["out", "shards"])
def test_a_damaged_tune_file_in_the_way_is_found_before_tuning(tiny_shards, tmp_path, capsys, monkeypatch, where):
    """The entry is merged into OUT/tune.json and SHARDS/tune.json: a damaged one was found only when writing,
    after the whole tune (its result lost)."""
    from tools.profiler import sweep

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    damaged = (tmp_path / "prof" if where == "out" else shards) / "tune.json"
    damaged.parent.mkdir(exist_ok=True)
    damaged.write_text("{not json")
    monkeypatch.setattr(sweep.Session, "measure", lambda *a: pytest.fail("measured before the tune files were checked"))
    argv = ["profile", str(shards), "--out", str(tmp_path / "prof"), "--tune", "--arch", "resnet18", "--no-progress"]
    assert cli_main(argv) == 2
    assert capsys.readouterr().err == (f"saturate profile: error: {damaged}: not a tune file this tune can be added "
                                       "to (Expecting property name enclosed in double quotes: line 1 column 2 "
                                       "(char 1)); move it away first\n")


def test_a_missing_split_is_found_before_tuning(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    (shards / "val.manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="val.manifest.json not found"):
        tuning.resolve_auto(auto_config(shards), world_size=1, is_main=True, say=print,
                            run_tune=lambda cfg: pytest.fail("tuned before the data was checked"))


def test_auto_with_synthetic_data_needs_no_tune():
    said = []
    cfg = build_config(overrides=dict(backend="synthetic", num_threads="auto", hw_decoder_load="auto"))
    resolved = tuning.resolve_auto(cfg, world_size=1, is_main=True, say=said.append)
    assert (resolved.num_threads, resolved.hw_decoder_load) == (1, None)
    assert said == ["loader 'auto': --backend synthetic reads no data; --num-threads 1"]


def test_a_damaged_tune_file_names_itself(tiny_shards, tmp_path):
    (tmp_path / "tune.json").write_text("{not json")
    with pytest.raises(ConfigError, match="--tune-file: .*tune.json is not a tune result"):
        tuning.resolve_auto(auto_config(tiny_shards, tune_file=str(tmp_path / "tune.json")), world_size=1,
                            is_main=True, say=print)


@pytest.mark.parametrize("edit, message", [
    (lambda e: e.update(setting=None), "is not a tune result (entry 0 has no 'match' and 'setting' objects)"),
    (lambda e: e.update(match=[1]), "is not a tune result (entry 0 has no 'match' and 'setting' objects)"),
    (lambda e: e["setting"].update(num_threads=0), "setting num_threads must be an integer in 1..1024, got 0"),
    (lambda e: e["setting"].update(num_threads="8"), "setting num_threads must be an integer in 1..1024, got '8'"),
    (lambda e: e["setting"].pop("num_threads"), "setting num_threads must be an integer in 1..1024, got None"),
    (lambda e: e["setting"].update(prefetch_depth=0), "setting prefetch_depth must be an integer >= 1 or null, got 0"),
    (lambda e: e["setting"].update(hw_decoder_load=float("nan")), "setting hw_decoder_load must be a number in [0, 1]"),
])
def test_a_hand_edited_tune_entry_is_a_clear_error(tiny_shards, tmp_path, edit, message):
    """Each was a KeyError/TypeError traceback, or (num_threads 0, '8', prefetch 0) handed to the loader as is."""
    path = tmp_path / "tune.json"
    cfg = auto_config(tiny_shards, tune_file=str(path))
    entry = an_entry(cfg)
    edit(entry)
    path.write_text(json.dumps({"format": tuning.FORMAT, "entries": [entry]}))
    with pytest.raises(ConfigError) as caught:
        tuning.resolve_auto(cfg, world_size=1, is_main=True, say=print)
    assert str(caught.value).startswith(f"--tune-file: {path}") and message in str(caught.value)


def test_an_entry_without_its_figures_still_applies(tiny_shards, tmp_path):
    """The figures are only words in the log line: a hand edit that drops them is no reason to stop."""
    path = tmp_path / "tune.json"
    cfg = auto_config(tiny_shards, tune_file=str(path))
    entry = {k: v for k, v in an_entry(cfg).items() if k not in ("ceiling_images_per_sec_per_gpu", "target")}
    entry["fraction_of_ceiling"] = None
    path.write_text(json.dumps({"format": tuning.FORMAT, "entries": [entry]}))
    said = []
    resolved = tuning.resolve_auto(cfg, world_size=1, is_main=True, say=said.append)
    assert (resolved.num_threads, resolved.prefetch_depth) == (3, 4)
    assert said == [f"loader 'auto': --num-threads 3, --prefetch-depth 4 (e2e ? of the ceiling ? img/s/GPU, the "
                    f"cheapest setting measured to reach ?); from {path}, tuned 2030-01-01T00:00:00+00:00"]


def test_an_entry_tuned_for_another_augmentation_policy_does_not_match(tiny_shards, tmp_path):
    """RandAugment costs a CPU loader several times a plain crop: its threads are not rrc-flip's."""
    plain = auto_config(tiny_shards, tune_file=str(tmp_path / "tune.json"))
    tuning.add_entry(tmp_path / "tune.json", an_entry(plain))
    policy = auto_config(tiny_shards, tune_file=str(tmp_path / "tune.json"), augment="randaugment", randaugment_m=7)
    assert tuning.run_key(policy, world_size=1)["augment"] == "randaugment(n=2,m=7)"
    with pytest.raises(ConfigError, match=r"--augment randaugment\(n=2,m=7\)"):
        tuning.resolve_auto(policy, world_size=1, is_main=True, say=print)
    tuning.add_entry(tmp_path / "tune.json", an_entry(policy, threads=2))
    assert tuning.resolve_auto(policy, world_size=1, is_main=True, say=print).num_threads == 2


def test_an_entry_written_before_the_policy_was_matched_still_serves_the_default_policy(tiny_shards, tmp_path):
    cfg = auto_config(tiny_shards, tune_file=str(tmp_path / "tune.json"))
    old = an_entry(cfg)
    del old["match"]["augment"]  # tune.json files from before the policy was part of the match
    tuning.add_entry(tmp_path / "tune.json", old)
    assert tuning.find_entry(tmp_path / "tune.json", tuning.run_key(cfg, world_size=1)) is not None
    policy = auto_config(tiny_shards, tune_file=str(tmp_path / "tune.json"), augment="trivialaugment")
    assert tuning.find_entry(tmp_path / "tune.json", tuning.run_key(policy, world_size=1)) is None
