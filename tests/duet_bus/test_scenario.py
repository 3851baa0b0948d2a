"""Scenario files: every problem reported at once, each with its path."""

from pathlib import Path

import pytest
import yaml

from duet_bus.cli import main
from duet_bus.errors import ConfigError
from duet_bus.scenario import ScenarioError, load_scenario, parse_duration, parse_scenario

SCENARIOS = sorted((Path(__file__).parents[2] / "scenarios").glob("*.yaml"))


def minimal(**extra) -> dict:
    return {"name": "t", "duration": "1h", **extra}


def problems(doc) -> list[str]:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(doc)
    return err.value.problems


def test_defaults_fill_a_minimal_scenario():
    s = parse_scenario(minimal())
    assert s.duration_s == 3600 and s.methods == ("base", "finetune", "duet_no_swa", "duet")
    assert s.bus_kind == "kafka" and s.bootstrap is None  # the embedded broker, never the memory bus
    assert set(s.network_mix) == {"4g_5", "4g_15", "5g_50", "5g_100"}
    assert s.profiles["4g_5"].transfer_ms(5_000_000) == pytest.approx(1000.0)


def test_every_problem_is_reported_with_its_path():
    found = problems({
        "name": "t", "duration": "soon",
        "devices": {"count": -3, "colour": "red", "network": {"6g": 1}, "upload": "jpeg"},
        "methods": ["base", "magic"], "shifts": [{"kind": "earthquake", "at": "1h"}, {"kind": "handover"}],
        "cloud": {"weight_encoding": "float8"}, "data": {"holdout": 1.5}, "torch_threads": 0,
        "model": {"swa": {"hidden": 0}},
    })
    text = "\n".join(found)
    for expected in (
        "devices.count: must be a positive integer, got -3",
        "devices.colour: unknown key",
        "devices.network.6g: unknown profile",
        "devices.upload: must be one of samples, images_uint8, embeddings, got 'jpeg'",
        "methods[1]: must be base, finetune, duet_no_swa, duet or duet_npN, got 'magic'",
        "shifts[0].kind: must be one of",
        "shifts[1].at: is required",
        "cloud.weight_encoding: must be one of float32, float16, int8, factored, factored_float16, got 'float8'",
        "data.holdout: must be less than 1, got 1.5",
        "duration: must be a duration",
        "torch_threads: must be a positive integer, got 0",
        "model.swa.hidden: must be a positive integer, got 0",
    ):
        assert expected in text, f"{expected!r} not in\n{text}"


def test_an_upload_setting_reaches_the_devices():
    assert parse_scenario(minimal()).upload == "samples"
    assert parse_scenario(minimal(devices={"upload": "images_uint8"})).upload == "images_uint8"


def test_the_generator_size_reaches_the_training_recipe():
    assert parse_scenario(minimal()).eval_config().swa.hidden_dim == 32
    scenario = parse_scenario(minimal(model={"swa": {"generators": 3, "hidden": 16}}))
    assert (scenario.eval_config().swa.n_generators, scenario.eval_config().swa.hidden_dim) == (3, 16)


def test_shift_parameters_and_times_are_checked():
    found = problems(minimal(shifts=[
        {"kind": "interest_drift", "at": "2h", "strength": 2},
        {"kind": "handover", "at": "10m", "fraction": 0.5, "devices": [1]},
        {"kind": "handover", "at": "10m", "strength": 0.5},
    ]))
    text = "\n".join(found)
    assert "shifts[0].strength: must be a number in (0, 1], got 2" in text
    assert "shifts[0].at: must be before the end of the run (1h), got 2h" in text
    assert "shifts[1]: give either fraction or devices, not both" in text
    assert "shifts[2].strength: unknown key" in text


def test_ml1m_needs_a_path_and_an_empty_file_is_an_error(tmp_path):
    assert "data.path: ml-1m is not bundled" in problems(minimal(data={"dataset": "ml-1m"}))[0]
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ScenarioError, match="must be a mapping"):
        load_scenario(empty)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), (12, 12.0),
                                           ("1.5h", 5400), ("soon", None), (True, None)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.name for p in SCENARIOS])
def test_shipped_scenarios_are_valid(path):
    if path.name == "ml1m_shift.yaml":  # ML-1M is not shipped: its file must be given
        with pytest.raises(ScenarioError) as info:
            load_scenario(path)
        assert info.value.problems == ["data.path: ml-1m/ratings.dat: no such file (relative paths are taken "
                                       "from the directory you run duet in)"]
        return
    load_scenario(path)


def test_validate_checks_named_files_exist(tmp_path):
    doc = {"name": "x", "duration": "1h", "data": {"path": str(tmp_path / "u.data")},
           "model": {"checkpoints": {"duet": str(tmp_path / "missing.pt")}}}
    with pytest.raises(ScenarioError) as info:
        parse_scenario(doc)
    assert [p.split(":")[0] for p in info.value.problems] == ["data.path", "model.checkpoints.duet"]
    (tmp_path / "u.data").write_text("1\t1\t5\t1\n")
    (tmp_path / "missing.pt").write_bytes(b"")
    parse_scenario(doc)


def test_yaml_errors_name_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nduration: 1h\ndevices:\n  count: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:5:1: not valid YAML: .*expected ',' or ']'"):
        load_scenario(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- name: x\n")
    with pytest.raises(ScenarioError, match=r"\(top level\): must be a mapping, got list"):
        load_scenario(listed)


def test_duet_validate_reports_every_problem_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "duration": "1h", "devices": {"count": 0}, "seed": "a"}))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "devices.count: must be a positive integer, got 0" in err and "seed: must be an integer" in err


def test_bus_security_is_checked_and_needs_a_cluster():
    text = "\n".join(problems(minimal(bus={"security": {"protocol": "TLS", "sasl_mechanism": "MD5", "pin": 1}})))
    for expected in (
        "bus.security.protocol: must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL, got 'TLS'",
        "bus.security.sasl_mechanism: must be one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, got 'MD5'",
        "bus.security.pin: unknown key",
        "bus.security: only for a cluster named in bus.bootstrap",
    ):
        assert expected in text, f"{expected!r} not in\n{text}"


def test_bus_security_reads_the_password_from_its_variable(monkeypatch):
    from duet_bus.errors import ConfigError
    from duet_bus.runner import kafka_security

    s = parse_scenario(minimal(bus={"bootstrap": "kafka:9093", "security": {
        "protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "username": "fleet", "password_env": "FLEET_PW"}}))
    monkeypatch.delenv("FLEET_PW", raising=False)
    with pytest.raises(ConfigError, match=r"\$FLEET_PW is not set"):
        kafka_security(s)
    monkeypatch.setenv("FLEET_PW", "s3cret")
    kwargs = kafka_security(s).aiokafka_kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL" and kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "fleet" and kwargs["sasl_plain_password"] == "s3cret"
    assert kwargs["ssl_context"] is not None
    assert kafka_security(parse_scenario(minimal())) is None


def test_set_overrides_settings_of_the_file(tmp_path):
    from duet_bus.errors import ConfigError
    from duet_bus.scenario import load_scenario

    path = tmp_path / "s.yaml"
    path.write_text("name: s\nmodel: {backbone: gru4rec}\ndevices: {count: 5}\nduration: 1h\n")
    scenario = load_scenario(path, ["model.backbone=din", "devices.count=7", "seeds=[0, 1]", "arrivals.kind=replay"])
    assert (scenario.backbone, scenario.device_count, scenario.seeds, scenario.arrivals) == ("din", 7, (0, 1), "replay")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_scenario(path, ["model.backbone"])
    with pytest.raises(ConfigError, match="name is not a mapping"):
        load_scenario(path, ["name.x=1"])
    with pytest.raises(ConfigError, match="model.backbone: must be one of"):
        load_scenario(path, ["model.backbone=resnet"])  # the value is checked like the file's own


def test_a_scenario_on_a_csv_click_log(tmp_path, udata):
    """`data: {dataset: csv, path: ...}`: a log of one's own streams like MovieLens; without a path it is one
    problem among the others; an interest drift on a log without genres is refused before anything trains."""
    from duet_bus.runner import prepare_data

    log = tmp_path / "clicks.csv"
    log.write_text("user,item,timestamp\n" + "".join(
        f"{u},{i},{t}\n" for u, i, _, t in (line.split("\t") for line in udata.read_text().splitlines())))
    assert any("data.path: csv is not bundled: give the path of your click log" in p
               for p in problems(minimal(data={"dataset": "csv"})))
    data = {"dataset": "csv", "path": str(log), "history_len": 5, "eval_negatives": 20}
    prepared = prepare_data(parse_scenario(minimal(data=data, devices={"count": 8})))
    assert prepared.name == "csv" and prepared.n_users == 24
    drift = parse_scenario(minimal(data=data, shifts=[{"kind": "interest_drift", "at": "30m"}]))
    with pytest.raises(ConfigError, match="shifts: interest_drift needs item genres, and these csv items have none"):
        prepare_data(drift)


def test_a_plugin_that_cannot_be_imported_is_named(tmp_path, capsys):
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    (tmp_path / "typo.py").write_text("def (\n")
    for plugin, message in ((str(tmp_path / "missing.py"), "missing.py: no such file"),
                            (str(tmp_path / "broken.py"), "broken.py: cannot import it (ModuleNotFoundError: No "
                                                          "module named 'no_such_module_here')"),
                            (str(tmp_path / "typo.py"), "typo.py: cannot import it (SyntaxError: invalid syntax "
                                                        "(typo.py, line 1))"),
                            ("no_such_plugin", "--plugin no_such_plugin: cannot import it")):
        assert main(["validate", str(SCENARIOS[0]), "--plugin", plugin]) == 2
        assert message in capsys.readouterr().err
