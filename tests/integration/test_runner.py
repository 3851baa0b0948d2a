"""A tiny scenario end to end on the real embedded broker."""

import csv
import gc
import json
from pathlib import Path

import pytest
import torch
import yaml

from duet_bus.runner import YOUNG_COLLECTION_EVERY, load_checkpoints, prepare_data, run_scenario
from duet_bus.scenario import load_scenario
from duet_bus.testing import write_udata, write_uitem


@pytest.fixture(scope="module")
def scenario_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenario")
    write_uitem(folder / "u.item")
    data = write_udata(folder / "u.data", per_user=40)
    doc = {
        "name": "tiny", "seed": 3,
        "data": {"dataset": "ml-100k", "path": str(data), "history_len": 5, "session_length": 3,
                 "holdout": 0.3, "eval_negatives": 20},
        "model": {"backbone": "gru4rec", "epochs": 2, "batch_size": 64, "swa": {"generators": 3}},
        "methods": ["base", "finetune", "duet_no_swa", "duet"],
        "finetune": {"steps": 3},
        "devices": {"count": 16, "network": {"4g_5": 1, "5g_100": 1}, "deadline": "20s"},
        "arrivals": {"kind": "poisson", "rate_per_hour": 2},
        "shifts": [{"kind": "handover", "at": "1h", "fraction": 0.5}],
        "window": "5m", "duration": "3h", "output": str(folder / "runs" / "tiny"), "dashboard": False,
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run(path, label, bootstrap, on_step=None, **changes):
    """Run the scenario into a sibling of its output folder, so that every run shares the checkpoint cache."""
    from dataclasses import replace

    scenario = load_scenario(path)
    scenario = replace(scenario, output=str(Path(scenario.output).parent / label), bootstrap=bootstrap, **changes)
    prepared = prepare_data(scenario)
    return run_scenario(scenario, prepared, load_checkpoints(scenario, prepared), on_step=on_step)


def rows(out):
    with open(out / "sessions.csv") as f:
        return list(csv.DictReader(f))


def shard_processes(marker: str) -> dict[int, list[str]]:
    """The running shard processes of `duet run --shards` (those given ``--shard-out``) whose arguments hold
    ``marker``: pid -> arguments."""
    import os

    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "--shard-out" in args and any(marker in arg for arg in args):
            found[int(pid)] = args
    return found


def sharded_run_under_way(scenario_file, out: Path, settings: list[str], stderr=None):
    """`duet run FILE --shards 2 --set S...` as a process, returned once both shards printed their first progress
    line (with each device's few held-out sessions spread over the run's first virtual hours, most of the run is
    still to do then). SIGINT at its default in it: a test run started where SIGINT is ignored (a script's
    background job) would hand that on, and a process that ignores SIGINT rightly does not stop on it."""
    import signal
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "duet_bus.cli", "run", str(scenario_file), "--shards", "2",
                                "--no-dashboard", "--output", str(out),
                                *(arg for setting in settings for arg in ("--set", setting))],
                               stdout=subprocess.PIPE, stderr=stderr, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    started = set()
    for line in process.stdout:
        if line.startswith(("shard 0/2: virtual", "shard 1/2: virtual")):
            started.add(line[:9])
        if len(started) == 2:
            return process
    raise AssertionError(f"the run ended before both shards were under way (exit code {process.wait()})")


def test_tiny_scenario_report_and_shift(scenario_file, kafka_bootstrap):
    threads, collector = torch.get_num_threads(), gc.get_threshold()
    during = set()
    doc, out = run(scenario_file, "first", kafka_bootstrap, on_step=lambda state: during.add(gc.get_threshold()))
    assert doc["run"]["finished"] and not doc["run"]["interrupted"]
    assert doc["scenario"]["torch_threads"] == 1 and torch.get_num_threads() == threads  # put back after the run
    assert during == {(YOUNG_COLLECTION_EVERY, *collector[1:])} and gc.get_threshold() == collector  # and this
    assert set(doc["methods"]) == {"base", "finetune", "duet_no_swa", "duet"}
    for m, r in doc["methods"].items():
        assert r["sessions"] == doc["run"]["sessions"] > 0
        assert 0 <= r["auc_mean"] <= 1 and r["fallbacks"] == 0
        assert set(r["delay_ms"]["measured"]) == {"bus_ms", "cloud_ms", "generation_ms", "finetune_ms", "compute_ms"}
        assert set(r["delay_ms"]["modelled"]) == {"upload_ms", "download_ms"}
    # Every method scores every session, so the paired difference is the difference of the means.
    base = doc["methods"]["base"]
    assert "vs_base" not in base
    for m in ("finetune", "duet_no_swa", "duet"):
        vs = doc["methods"][m]["vs_base"]
        assert vs["sessions"] == base["sessions"] and vs["won"] + vs["tied"] + vs["lost"] == pytest.approx(1)
        assert vs["mean"] == pytest.approx(doc["methods"][m]["auc_mean"] - base["auc_mean"], abs=1e-12)
        assert 0 < vs["se"] < doc["methods"][m]["auc_std"]
    duet = doc["methods"]["duet"]
    assert duet["delay_ms"]["measured"]["generation_ms"]["p50"] > 0 and duet["payload_bytes"]["download_mean"] > 0
    assert doc["methods"]["base"]["payload_bytes"]["upload_mean"] == 0  # base never asks the cloud
    assert doc["run"]["cloud"]["served"] == 2 * doc["run"]["sessions"]  # duet_no_swa and duet, over Kafka
    assert {p.name for p in out.glob("*.png")} == {"accuracy_around_shifts.png", "delays.png"}
    assert json.loads((out / "results.json").read_text()) == doc

    # The shift is in the per-session data: shifted devices stream another user's sessions after it.
    (shift,) = doc["shifts"]
    assert shift["kind"] == "handover" and shift["devices_shifted"] == 8
    table = rows(out)
    moved = {r["device_id"] for r in table if float(r["start_s"]) >= shift["at_s"]
             and r["user"] != r["device_id"].split("-u")[1]}
    assert moved and moved <= set(shift["devices"])
    before = [r for r in table if float(r["start_s"]) < shift["at_s"]]
    assert all(r["user"] == r["device_id"].split("-u")[1] for r in before)
    assert shift["around"]["duet"]["0"]["sessions"] > 0


def test_same_seed_same_sessions_and_accuracy(scenario_file, kafka_bootstrap):
    _, a = run(scenario_file, "again-a", kafka_bootstrap)
    _, b = run(scenario_file, "again-b", kafka_bootstrap)
    ra, rb = rows(a), rows(b)
    assert [(r["session_id"], r["method"], r["start_s"], r["user"]) for r in ra] == \
           [(r["session_id"], r["method"], r["start_s"], r["user"]) for r in rb]
    assert [float(r["auc"]) for r in ra] == pytest.approx([float(r["auc"]) for r in rb], abs=1e-9)


def test_factored_replies_score_as_the_full_weights(scenario_file, kafka_bootstrap):
    """`cloud.weight_encoding: factored`: the devices combine H with the W2, b2 they hold; same AUCs."""
    _, full = run(scenario_file, "full", kafka_bootstrap)
    doc, factored = run(scenario_file, "factored", kafka_bootstrap, weight_encoding="factored")
    assert doc["run"]["over_the_bus"]["answered"] == doc["run"]["over_the_bus"]["started"] > 0
    ra, rb = rows(full), rows(factored)
    assert [(r["session_id"], r["method"]) for r in ra] == [(r["session_id"], r["method"]) for r in rb]
    assert [float(r["auc"]) for r in ra] == pytest.approx([float(r["auc"]) for r in rb], abs=1e-6)


def test_report_rerenders_from_the_files(scenario_file, kafka_bootstrap, capsys):
    from duet_bus.cli import main

    doc, out = run(scenario_file, "rerender", kafka_bootstrap)
    for png in out.glob("*.png"):
        png.unlink()
    assert main(["report", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["methods"] == doc["methods"]
    assert (out / "accuracy_around_shifts.png").is_file()
    assert "DUET" in capsys.readouterr().out


def _by_session(out):
    return {(r["session_id"], r["method"]): r for r in rows(out)}


@pytest.mark.parametrize("kind", ["memory", "kafka"])
def test_batched_devices_score_as_one_device_at_a_time(scenario_file, kafka_bootstrap, kind):
    """`devices.batched` (each instant's device side as one computation: stacked fine-tuning, one
    forward per method) gives every session the metrics of the one-device-at-a-time path, to 1e-6, for
    all four methods; device times of the sessions not timed alone are marked calibrated. torch's thread
    count does not change them either."""
    _, alone = run(scenario_file, f"alone-{kind}", kafka_bootstrap, batched=False, bus_kind=kind, torch_threads=2)
    _, batched = run(scenario_file, f"batched-{kind}", kafka_bootstrap, batched=True, bus_kind=kind,
                     timing_share=0.2)
    a, b = _by_session(alone), _by_session(batched)
    assert a.keys() == b.keys() and len(a) > 100
    for key, row in a.items():
        for metric in ("auc", "ndcg10", "hr10", "logloss"):
            assert float(b[key][metric]) == pytest.approx(float(row[metric]), abs=1e-6), (key, metric)
        assert b[key]["fallback"] == row["fallback"] == "False"
    assert {r["device_timing"] for r in a.values()} == {"measured"}
    timing = [r["device_timing"] for r in b.values()]
    assert 0 < timing.count("measured") < timing.count("calibrated")
    assert all(float(r["compute_ms"]) > 0 for r in b.values())
    assert all(float(r["finetune_ms"]) > 0 for r in b.values() if r["method"] == "finetune")


def test_a_run_over_seeds_reports_mean_std_and_paired_differences(scenario_file, capsys):
    """`duet run --seeds 2`: each seed a run of its own (its folder, its checkpoints), and one report over
    seeds: per method the mean and std over seeds, and the paired difference against base pooled over
    every seed's sessions and per seed. `duet report` recomputes it from the seeds' folders."""
    import numpy as np

    from duet_bus.cli import main

    out = Path(load_scenario(scenario_file).output).parent / "seeds"
    doc_file = Path(scenario_file).with_name("seeds.yaml")
    doc_file.write_text(Path(scenario_file).read_text() + "\nbus: {kind: memory}\n")
    assert main(["run", str(doc_file), "--seeds", "2", "--output", str(out), "--no-dashboard"]) == 0
    printed = capsys.readouterr().out
    assert "2 seeds (3, 4)" in printed and "seeds won" in printed
    doc = json.loads((out / "results.json").read_text())
    assert doc["kind"] == "seeds" and doc["seeds"] == [3, 4]
    per_seed = {k: json.loads((out / f"seed-{k}" / "results.json").read_text()) for k in (3, 4)}
    for k, one in per_seed.items():
        assert one["scenario"]["seed"] == k and one["run"]["finished"]
    for m, r in doc["methods"].items():
        values = [per_seed[k]["methods"][m]["auc_mean"] for k in (3, 4)]
        assert r["auc_mean"] == pytest.approx(np.mean(values))
        assert r["auc_std"] == pytest.approx(np.std(values, ddof=1))
        assert [p["seed"] for p in r["per_seed"]] == [3, 4]
        assert r["sessions"] == sum(per_seed[k]["methods"][m]["sessions"] for k in (3, 4))
        if m != "base":
            vs = r["vs_base"]
            assert vs["sessions"] == r["sessions"]
            assert vs["seed_mean"] == pytest.approx(np.mean([per_seed[k]["methods"][m]["vs_base"]["mean"]
                                                             for k in (3, 4)]))
            # Pooled over seeds: the session-weighted mean of the seeds' paired differences.
            weights = [per_seed[k]["methods"][m]["vs_base"]["sessions"] for k in (3, 4)]
            assert vs["mean"] == pytest.approx(np.average(
                [per_seed[k]["methods"][m]["vs_base"]["mean"] for k in (3, 4)], weights=weights))
            assert 0 <= vs["seeds_won"] <= 2 and vs["se"] > 0
    # The two seeds differ (data, training, devices): not one run written twice.
    assert per_seed[3]["methods"]["base"]["auc_mean"] != per_seed[4]["methods"]["base"]["auc_mean"]
    assert main(["report", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["methods"] == doc["methods"]


def test_seeds_in_the_scenario_file_and_their_errors(scenario_file):
    from duet_bus.scenario import ScenarioError, parse_scenario

    doc = yaml.safe_load(Path(scenario_file).read_text())
    doc.pop("seed")
    assert parse_scenario({**doc, "seeds": [0, 1, 2]}).seeds == (0, 1, 2)
    assert parse_scenario(doc).seeds == (0,)
    for bad, message in (([], "seeds: must be a list of non-negative integers"),
                         ([1, 1], "seeds: lists a seed twice"), ("3", "seeds: must be a list")):
        with pytest.raises(ScenarioError, match=message):
            parse_scenario({**doc, "seeds": bad})
    with pytest.raises(ScenarioError, match="give either seed or seeds"):
        parse_scenario({**doc, "seed": 1, "seeds": [1, 2]})
    doc["model"]["checkpoints"] = {"base": str(scenario_file)}  # any existing file: the check is first
    with pytest.raises(ScenarioError, match="model.checkpoints: cannot be combined with several seeds"):
        parse_scenario({**doc, "seeds": [1, 2]})


def _same_run_over_two_shards(single: Path, out: Path) -> tuple[dict, dict]:
    """Check that the run in ``out`` (2 shards) has the sessions of ``single`` (one process) in the same
    order with the same metrics (to 1e-6) and the same shifted devices; return both results documents."""
    a, b = _by_session(single), _by_session(out)
    assert list(a) == list(b) and len(a) > 100  # same sessions, in the same order
    for key, row in a.items():
        for column in ("auc", "ndcg10", "hr10", "logloss", "start_s", "user", "profile", "fallback"):
            assert b[key][column] == row[column] or float(b[key][column]) == pytest.approx(float(row[column]),
                                                                                          abs=1e-6), (key, column)
    one, two = (json.loads((d / "results.json").read_text()) for d in (single, out))
    assert [s["devices"] for s in one["shifts"]] == [s["devices"] for s in two["shifts"]]
    assert [s["shard"] for s in two["run"]["shards"]] == [0, 1]
    return one, two


def test_two_shards_give_the_one_process_run(scenario_file, kafka_bootstrap, capsys):
    """`duet run --shards 2`: two runner processes, one cloud, one report with the same sessions and the
    same per-session metrics as one process (delays are measured and differ), the shift's devices from
    both shards, and the shards' records met on the reports topic."""
    from duet_bus.cli import main

    _, single = run(scenario_file, "one-process", kafka_bootstrap)
    out = single.parent / "two-shards"
    code = main(["run", str(scenario_file), "--shards", "2", "--output", str(out), "--no-dashboard",
                 "--set", f"bus.bootstrap={kafka_bootstrap}"])
    assert code == 0
    one, two = _same_run_over_two_shards(single, out)
    assert sum(s["sessions"] for s in two["run"]["shards"]) == two["run"]["sessions"] == one["run"]["sessions"]
    assert two["run"]["over_the_bus"]["answered"] == two["run"]["cloud"]["served"] > 0
    assert "2 shards started" in capsys.readouterr().out


def test_two_in_process_shards_give_the_one_process_run(scenario_file, capsys, monkeypatch):
    """`duet run --shards 2` on the in-process bus: two processes, each with its own cloud, their records
    through files, one report with the same sessions and per-session metrics as one process, the shift's
    devices from both shards and every request answered by the shards' clouds together. (Here the parent
    believes it has one core, and says what that means for the device times.)"""
    import os

    from duet_bus.cli import main

    monkeypatch.setattr(os, "cpu_count", lambda: 1)

    _, single = run(scenario_file, "memory-one-process", None, bus_kind="memory")
    out = single.parent / "memory-two-shards"
    code = main(["run", str(scenario_file), "--shards", "2", "--output", str(out), "--no-dashboard",
                 "--set", "bus.kind=memory"])
    assert code == 0
    one, two = _same_run_over_two_shards(single, out)
    assert all(s["sessions"] > 0 for s in two["run"]["shards"])
    assert two["run"]["cloud"]["workers"] == 2  # one in each shard
    assert not list(out.glob(".shards-*"))  # the shards' records files, read and removed
    assert two["run"]["over_the_bus"]["answered"] == two["run"]["cloud"]["served"] == \
        one["run"]["over_the_bus"]["answered"] > 0
    printed = capsys.readouterr().out
    assert "2 shards started, each with its own in-process cloud" in printed
    assert "--shards 2 on 1 core: the shards share cores" in printed
    for k in (0, 1):  # each shard's progress and last line, through the parent
        assert f"shard {k}/2: virtual   3.00 h" in printed and f"\nshard {k}/2 of run" in printed, printed


EXAMPLES = Path(__file__).parents[2] / "examples"


def test_a_plugin_shift_runs_in_one_process_and_in_shards(scenario_file):
    """`duet run --plugin examples/accidental_taps.py` with that shift in the scenario: the run shifts its
    devices with it, and so do the shards of `--shards 2`, the same devices with the same sessions and
    metrics as one process. (Before, the shards were not given the plugin and each failed on the scenario's
    unknown shift kind.)"""
    import sys

    from duet_bus.cli import main
    from duet_bus.shifts import SHIFTS

    doc = yaml.safe_load(scenario_file.read_text())
    doc["shifts"][0].update(kind="accidental_taps", rate=0.5)
    path = scenario_file.with_name("taps.yaml")
    path.write_text(yaml.safe_dump(doc))
    runs = Path(doc["output"]).parent  # beside the scenario's output: the checkpoints cached
    try:
        for label, more in (("taps-one", []), ("taps-two", ["--shards", "2"])):
            assert main(["run", str(path), "--plugin", str(EXAMPLES / "accidental_taps.py"), "--output",
                         str(runs / label), "--no-dashboard", "--set", "bus.kind=memory", *more]) == 0
        one, _ = _same_run_over_two_shards(runs / "taps-one", runs / "taps-two")
        assert [s["kind"] for s in one["shifts"]] == ["accidental_taps"] and one["shifts"][0]["devices"]
    finally:
        SHIFTS.pop("accidental_taps", None)
        sys.modules.pop("accidental_taps", None)


def test_a_plugin_backbone_trains_evaluates_serves_and_runs(scenario_file, tmp_path, monkeypatch, capsys):
    """A recommendation backbone of one's own (`examples/meanpool.py`: `register_backbone`), given with --plugin
    as a file: `duet train` and `duet evaluate` train it, its checkpoint names it (so `duet info` without the
    plugin says what is missing), and a scenario runs it through the bus, in one process and in 2 shards
    alike. The same module given by name (on the path) does the same."""
    import sys

    from duet_bus.cli import main
    from duet_bus.models import BACKBONES

    doc = yaml.safe_load(scenario_file.read_text())
    data = ["--data-path", doc["data"]["path"], "--history-len", "5", "--eval-negatives", "20", "--epochs", "1"]
    plugin = ["--plugin", str(EXAMPLES / "meanpool.py")]
    runs = Path(doc["output"]).parent  # beside the scenario's output: the checkpoints cached for both runs
    try:
        assert main(["train", *plugin, *data, "--backbone", "meanpool", "--out", str(tmp_path / "m.pt")]) == 0
        BACKBONES.pop("meanpool")
        sys.modules.pop("meanpool")
        assert main(["info", str(tmp_path / "m.pt")]) == 2
        assert "unknown backbone 'meanpool'" in capsys.readouterr().err
        monkeypatch.syspath_prepend(str(EXAMPLES))  # by module name
        assert main(["info", "--plugin", "meanpool", str(tmp_path / "m.pt")]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["backbone"] == "meanpool" and info["layer_shapes"] == [[32, 32]]
        assert main(["evaluate", *plugin, *data, "--backbone", "meanpool", "--seeds", "1", "--methods",
                     "base,duet", "--out", str(tmp_path / "e.json")]) == 0
        assert set(json.loads((tmp_path / "e.json").read_text())["methods"]) == {"base", "duet"}
        for label, more in (("meanpool-one", []), ("meanpool-two", ["--shards", "2"])):
            assert main(["run", str(scenario_file), *plugin, "--output", str(runs / label), "--no-dashboard",
                         "--set", "bus.kind=memory", "--set", "model.backbone=meanpool", *more]) == 0
        one, _ = _same_run_over_two_shards(runs / "meanpool-one", runs / "meanpool-two")
        assert one["run"]["over_the_bus"]["answered"] == one["run"]["over_the_bus"]["started"] > 0
    finally:
        BACKBONES.pop("meanpool", None)
        sys.modules.pop("meanpool", None)


def test_compare_pairs_two_runs_session_by_session(scenario_file, tmp_path, capsys):
    """`duet compare A B`: two runs of the tiny scenario, float32 against int8 replies. The only setting that
    differs is named; every session pairs up; the device-side methods (no reply) score every session the same,
    the cloud's methods within the int8 rounding. Two runs over seeds pair seed with seed. Runs that share no
    session, and a run over seeds against a single run, are refused with what is wrong."""
    import shutil

    from duet_bus.cli import main

    runs = Path(yaml.safe_load(scenario_file.read_text())["output"]).parent  # the checkpoints cached
    for label, encoding in (("cmp-float32", "float32"), ("cmp-int8", "int8")):
        assert main(["run", str(scenario_file), "--output", str(runs / label), "--no-dashboard", "--set",
                     "bus.kind=memory", "--set", f"cloud.weight_encoding={encoding}"]) == 0
    capsys.readouterr()
    out = tmp_path / "compare.json"
    assert main(["compare", str(runs / "cmp-float32"), str(runs / "cmp-int8"), "--out", str(out)]) == 0
    assert "Settings that differ: weight_encoding: 'float32' -> 'int8'" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["differences"] == ["weight_encoding: 'float32' -> 'int8'"] and doc["only_a"] == doc["only_b"] == 0
    sessions = {m: r["sessions"] for m, r in doc["methods"].items()}
    assert set(sessions) == {"base", "finetune", "duet_no_swa", "duet"} and len(set(sessions.values())) == 1
    for method in ("base", "finetune"):
        assert doc["methods"][method]["changed"] == 0 and doc["methods"][method]["auc_a"] == \
            doc["methods"][method]["auc_b"]
    for method in ("duet_no_swa", "duet"):
        assert doc["methods"][method]["diff_max_abs"] < 0.05, doc["methods"][method]

    other = tmp_path / "other"  # the same rows under other session ids: nothing to pair
    shutil.copytree(runs / "cmp-int8", other)
    text = (other / "sessions.csv").read_text().splitlines()
    (other / "sessions.csv").write_text("\n".join([text[0]] + ["x" + line for line in text[1:]]) + "\n")
    assert main(["compare", str(runs / "cmp-float32"), str(other)]) == 2
    assert "have no session in common" in capsys.readouterr().err

    # Two runs over seeds: seed with seed, pooled and per seed; one against a single run is refused.
    for label, encoding in (("cmp-seeds-float32", "float32"), ("cmp-seeds-int8", "int8")):
        assert main(["run", str(scenario_file), "--seeds", "2", "--output", str(runs / label), "--set",
                     "bus.kind=memory", "--set", f"cloud.weight_encoding={encoding}"]) == 0
    capsys.readouterr()
    assert main(["compare", str(runs / "cmp-seeds-float32"), str(runs / "cmp-seeds-int8"), "--out", str(out)]) == 0
    assert "seeds 3, 4 pooled" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["seeds"] == [3, 4] and doc["differences"] == ["weight_encoding: 'float32' -> 'int8'"]
    for method, r in doc["methods"].items():
        assert r["seeds_compared"] == 2 and r["sessions"] > sessions[method], (method, r)
        if method in ("base", "finetune"):
            assert r["changed"] == 0 and r["seed_mean"] == r["seed_std"] == 0 and r["seeds_better"] == 0
    assert main(["compare", str(runs / "cmp-seeds-int8"), str(runs / "cmp-int8")]) == 2
    assert "is a run over seeds and the other is not" in capsys.readouterr().err


def run_killing_shard_0(scenario_file, tmp_path, label: str, settings: tuple[str, ...] = ()) -> list[Path]:
    """The in-process shards of `duet run --shards 2` (`_memory_sharded`, ``--set`` each of ``settings``) with
    shard 0 SIGKILLed once both are under way: the run must end with an error naming that exit code. The
    shards' records files (shard 0's never written). ``settings`` must make the run long enough (the tiny
    scenario's 16 devices are done within a second of their first progress line, and a shard done before the
    kill has written its file: a failure seen once)."""
    import asyncio
    import os
    import signal

    from duet_bus.errors import DuetError
    from duet_bus.shards import _memory_sharded

    scenario = load_scenario(scenario_file)
    prepared = prepare_data(scenario)
    load_checkpoints(scenario, prepared)  # cached for the shards, as `duet run --shards` does first
    files = [tmp_path / f"shard-{k}.records" for k in (0, 1)]
    started, killed = set(), []

    def echo(line: str) -> None:
        if line.startswith(("shard 0/2: virtual", "shard 1/2: virtual")):
            started.add(line[:9])
        if not killed and len(started) == 2:
            for pid in shard_processes(str(files[0])):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    out = Path(scenario.output).parent / label  # beside the run's output: the checkpoints cached above
    args = ["run", str(scenario_file), "--output", str(out), "--set", "bus.kind=memory",
            *(arg for setting in settings for arg in ("--set", setting))]
    with pytest.raises(DuetError, match=r"a shard process failed \(exit code -9\)"):
        asyncio.run(_memory_sharded("r1", files, args, echo))
    assert killed and not files[0].exists()
    return files


def test_a_shard_killed_mid_run_stops_the_run_and_its_other_shards(scenario_file, tmp_path):
    """SIGKILL one in-process shard mid-run: the run ends with an error naming its exit code, and the other
    shard is stopped and reaped, not left running or waited for."""
    run_killing_shard_0(scenario_file, tmp_path, "killed", ("devices.count=2000",))
    assert shard_processes(str(tmp_path)) == {}  # both gone: the one killed, the one stopped after it


def test_a_shard_asked_to_stop_reports_even_where_sigint_is_ignored(scenario_file, tmp_path):
    """A run started with SIGINT ignored (a script's background job) hands that to its shards. When one shard
    dies, the run asks the other to stop, with SIGINT: that shard writes its sessions so far to its file and
    exits. (Before, it ignored the request and was killed `STOP_S` later, its sessions lost.)"""
    import signal

    from duet_bus.shards import read_records

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what the shards inherit from such a parent
    try:
        files = run_killing_shard_0(scenario_file, tmp_path, "ignored", ("devices.count=2000",))
    finally:
        signal.signal(signal.SIGINT, before)
    # The other shard's sessions so far, handed over on the parent's request.
    last = read_records(files[1], "r1", 1, 2)[-1].run
    assert last["interrupted"] and not last["finished"] and last["sessions"] > 0, last


def test_shards_stop_when_their_parent_is_killed(scenario_file, tmp_path, capsys):
    """SIGKILL to `duet run --shards 2` once both shards are under way: each shard, in a session of its own,
    sees the end of the pipe its parent held and stops as if asked, its sessions so far written to its file in
    the run's output folder. (Before, they ran on until their next line of output found the parent's pipe
    closed, and died of it; and their files were in a temporary folder nobody read.) `duet run --collect 2
    --run-id R` then writes the run's report from those files, marked interrupted, and removes them."""
    import time

    from duet_bus.cli import main

    out = Path(load_scenario(scenario_file).output).parent / "orphaned"  # beside the run's: the checkpoints cached
    process = sharded_run_under_way(scenario_file, out, ["bus.kind=memory", "devices.count=2000"])
    shards = {pid: (Path(args[args.index("--shard-out") + 1]), args[args.index("--run-id") + 1])
              for pid, args in shard_processes(str(out)).items()}  # pid -> its records file, the run's id
    process.kill()
    process.communicate()
    assert len(shards) == 2
    run_id = next(iter(shards.values()))[1]
    assert {(path.parent, r) for path, r in shards.values()} == {(out / f".shards-{run_id}", run_id)}
    give_up = time.monotonic() + 120  # a file that exists is complete (written, then renamed)
    while not all(path.exists() for path, _ in shards.values()) and time.monotonic() < give_up:
        time.sleep(0.1)
    assert main(["run", str(scenario_file), "--collect", "2", "--run-id", run_id, "--output", str(out),
                 "--set", "bus.kind=memory", "--set", "devices.count=2000"]) == 0
    assert f"collecting run {run_id} (2 shards) from {out / f'.shards-{run_id}'}" in capsys.readouterr().out
    run = json.loads((out / "results.json").read_text())["run"]
    assert run["interrupted"] and not run["finished"]
    assert [s["shard"] for s in run["shards"]] == [0, 1] and all(s["sessions"] > 0 for s in run["shards"])
    assert run["wall_s"] == max(s["wall_s"] for s in run["shards"])
    assert len(rows(out)) == 4 * run["sessions"] and not (out / f".shards-{run_id}").exists()


@pytest.mark.parametrize("kind, stop", [("memory", "SIGINT"), ("kafka", "SIGINT"), ("memory", "SIGTERM")])
def test_ctrl_c_on_shards_reports_the_sessions_done_so_far(scenario_file, kafka_bootstrap, tmp_path, kind, stop):
    """SIGINT to `duet run --shards 2` (what Ctrl-C sends it; its shards run in sessions of their own) once
    both shards are under way: each shard is asked to stop and hands over its sessions so far (a file, or
    the reports topic), and the report is written, marked interrupted, as a one-process run's is; the exit
    code is 130. SIGTERM (a scheduler's stop) does the same."""
    import signal

    out = Path(load_scenario(scenario_file).output).parent / f"interrupted-{kind}-{stop}"  # the checkpoints cached
    bus = "bus.kind=memory" if kind == "memory" else f"bus.bootstrap={kafka_bootstrap}"
    process = sharded_run_under_way(scenario_file, out, [bus, "devices.count=2000"])
    process.send_signal(getattr(signal, stop))
    printed = process.communicate(timeout=180)[0]
    assert process.returncode == 130, printed
    assert "interrupted; the report covers the sessions done so far" in printed
    run = json.loads((out / "results.json").read_text())["run"]
    assert run["interrupted"] and not run["finished"]
    assert [s["shard"] for s in run["shards"]] == [0, 1] and all(s["sessions"] > 0 for s in run["shards"])
    assert run["virtual_s"] < 3 * 3600 and len(rows(out)) == 4 * run["sessions"]  # stopped before its end


def test_ctrl_c_twice_on_shards_ends_at_once_and_cleanly(scenario_file, tmp_path):
    """Ctrl-C twice on `duet run --shards 2`: the second ends the run without waiting for the shards, which
    end with it (none left running), and without asyncio's "Exception ignored ... Event loop is closed"
    about their pipes (printed before: the loop closed with the shards' transports still open)."""
    import signal
    import subprocess
    import time

    out = Path(load_scenario(scenario_file).output).parent / "twice"  # beside the run's: the checkpoints cached
    process = sharded_run_under_way(scenario_file, out, ["bus.kind=memory", "devices.count=2000"],
                                    stderr=subprocess.PIPE)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=180)
    assert process.returncode == 130, errors[-2000:]
    assert "Exception ignored" not in errors, errors[-2000:]
    assert shard_processes(str(out)) == {}


def test_processes_wanting_the_same_checkpoint_at_once_train_it_once(scenario_file, tmp_path):
    """Two processes on one cold cache want the same recipes at the same time (the shards of a run did, when
    their cache was not the parent's; two runs on one output folder): one trains each recipe while the other
    waits for its lock, and then loads it; both get the same models, and no temporary or lock file is left.
    (Before the lock each trained every recipe, and before their temporary files were their own one crashed
    renaming the other's.)"""
    import subprocess
    import sys

    # A progress display that counts the epochs this process trained.
    code = ("import sys; from pathlib import Path; "
            "from duet_bus.runner import load_checkpoints, prepare_data; from duet_bus.scenario import load_scenario; "
            "s = load_scenario(sys.argv[1]); p = prepare_data(s); epochs = []; "
            "progress = type('P', (), {'add_task': lambda self, label, total: epochs.append(label), "
            "'advance': lambda self, task: None, 'remove_task': lambda self, task: None})(); "
            "versions = sorted(c.model_version for c in load_checkpoints(s, p, progress, Path(sys.argv[2])).values()); "
            "print(len(epochs)); print(versions)")
    both = [subprocess.Popen([sys.executable, "-c", code, str(scenario_file), str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in both]
    assert [p.returncode for p in both] == [0, 0], [err[-2000:] for _, err in outs]
    (trained_a, models_a), (trained_b, models_b) = (out.splitlines()[-2:] for out, _ in outs)
    assert models_a == models_b  # the same models
    # Three recipes (base, duet_no_swa, duet) of 2 epochs each, trained once between the two processes.
    assert int(trained_a) + int(trained_b) == 3 * 2, (trained_a, trained_b)
    assert sorted(f.suffix for f in tmp_path.iterdir()) == [".pt"] * 3  # no .tmp, no .lock


def test_shard_flags_are_checked(scenario_file, capsys, tmp_path):
    from duet_bus.cli import main

    for args, message in ((["--shard", "2/2", "--run-id", "x"], "--shard: must be k/N with 0 <= k < N"),
                          (["--shard", "0/2"], "--shard: needs --run-id"),
                          (["--shard", "0/2", "--run-id", "x"], "--shard: shards meet on a Kafka cluster"),
                          (["--shards", "2", "--seeds", "2"], "--seeds and --shards: one at a time"),
                          (["--collect", "2"], "--collect: needs --run-id"),
                          (["--shards", "0"], "--shards: must be a positive number, got 0"),
                          (["--collect", "-1", "--run-id", "x"], "--collect: must be a positive number"),
                          (["--shard", "one/two", "--run-id", "x"], "--shard: must be k/N"),
                          (["--shard-out", "x.records"], "--shard-out: only with --shard"),
                          (["--shard", "0/2", "--run-id", "x", "--shard-out", "x.records"],
                           "--shard-out: only for shards on the in-process bus"),
                          (["--collect", "2", "--run-id", "x", "--set", "bus.kind=memory"],
                           "--collect: no records of run x in "),
                          (["--collect", "2", "--run-id", "../x", "--set", "bus.kind=memory"],
                           "--run-id: 1 to 64 letters, digits, - or _")):
        assert main(["run", str(scenario_file), *args]) == 2
        assert message in capsys.readouterr().err, args
    # In-process shards' records of which one shard's file is missing: named, and nothing written.
    out = tmp_path / "run"
    (out / ".shards-x").mkdir(parents=True)
    assert main(["run", str(scenario_file), "--collect", "2", "--run-id", "x", "--output", str(out),
                 "--set", "bus.kind=memory"]) == 2
    assert "run x: shard 0 wrote no records (No such file or directory: " in capsys.readouterr().err
    assert not (out / "results.json").exists() and (out / ".shards-x").is_dir()


def test_shards_on_several_hosts_and_a_collector(scenario_file, kafka_bootstrap):
    """The multi-host form: `duet cloud`-like workers serving the run's checkpoints, each shard its own
    `duet run --shard k/2 --run-id R`, then `duet run --collect 2 --run-id R` writes the one report."""
    import asyncio
    import threading
    from dataclasses import replace

    from cloud import CloudConfig, GeneratorService
    from duet_bus.bus import KafkaBus
    from duet_bus.cli import main
    from duet_bus.shards import shard_topics

    scenario = load_scenario(scenario_file)
    scenario = replace(scenario, output=str(Path(scenario.output).parent / "hosts"), bootstrap=kafka_bootstrap)
    prepared = prepare_data(scenario)
    checkpoints = load_checkpoints(scenario, prepared)
    stop, ready = threading.Event(), threading.Event()

    async def cloud():
        bus = KafkaBus(kafka_bootstrap)
        await bus.start()
        topics = shard_topics(2)
        await bus.ensure_topics(topics.all())
        service = GeneratorService(bus, [c for m, c in checkpoints.items() if m.startswith("duet")],
                                   CloudConfig(group_id="hosts-cloud", topics=topics))
        await service.start()
        halt = asyncio.Event()
        task = asyncio.create_task(service.run(halt))
        while service.consumer.assignment() != {(topics.sessions, p) for p in range(topics.session_partitions)}:
            await asyncio.sleep(0.05)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        halt.set()
        await task
        await service.stop()
        await bus.stop()

    thread = threading.Thread(target=asyncio.run, args=(cloud(),))
    thread.start()
    try:
        assert ready.wait(60)
        common = ["--set", f"bus.bootstrap={kafka_bootstrap}", "--output", scenario.output, "--no-dashboard"]
        for k in (0, 1):
            assert main(["run", str(scenario_file), "--shard", f"{k}/2", "--run-id", "hosts-run", *common]) == 0
    finally:
        stop.set()
        thread.join(30)
    assert main(["run", str(scenario_file), "--collect", "2", "--run-id", "hosts-run", *common]) == 0
    _, single = run(scenario_file, "hosts-single", kafka_bootstrap)
    a, b = _by_session(single), _by_session(Path(scenario.output))
    assert list(a) == list(b)
    assert all(float(b[k]["auc"]) == pytest.approx(float(r["auc"]), abs=1e-6) for k, r in a.items())
