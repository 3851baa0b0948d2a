import signal
import subprocess
import sys
import time

import pytest

from duet_bus.broker import EmbeddedBroker, _answers


def test_broker_starts_answers_and_stops():
    with EmbeddedBroker() as broker:
        assert broker.bootstrap.startswith("127.0.0.1:")
        assert _answers(broker.port)
        process = broker.process
    assert process.poll() is not None  # stopped with the context


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_broker_dies_with_duet_broker(sig):
    """SIGTERM stops it cleanly; even SIGKILL, which gives `duet broker` no chance, takes the broker with it."""
    proc = subprocess.Popen([sys.executable, "-m", "duet_bus.cli", "broker"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        port = int(line.split("127.0.0.1:")[1].split(";")[0].split()[0])
        assert _answers(port)
        proc.send_signal(sig)
        proc.wait(timeout=15)
        deadline = time.monotonic() + 10
        while _answers(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _answers(port), "the broker outlived `duet broker`"
    finally:
        proc.kill()


def test_security_settings_map_to_aiokafka_and_reject_contradictions():
    from duet_bus.bus import KafkaBus, Security
    from duet_bus.errors import ConfigError

    assert Security().aiokafka_kwargs() == {}
    bus = KafkaBus("kafka:9092", security=Security("SASL_PLAINTEXT", "PLAIN", "u", "p"))
    assert bus.security == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
                            "sasl_plain_username": "u", "sasl_plain_password": "p"}
    with pytest.raises(ConfigError, match="needs a username and a password"):
        Security("SASL_SSL", "PLAIN", "u")
    with pytest.raises(ConfigError, match="needs one of PLAIN"):
        Security("SASL_SSL", None, "u", "p")
    with pytest.raises(ConfigError, match="use SASL_PLAINTEXT or SASL_SSL"):
        Security("SSL", "PLAIN", "u", "p")
    with pytest.raises(ConfigError, match="ssl cafile 'no-such-ca.pem'"):
        Security("SSL", ssl_cafile="no-such-ca.pem").aiokafka_kwargs()


def test_duet_cloud_takes_security_from_flags_and_environment(monkeypatch):
    from duet_bus.cli import _security, build_parser

    monkeypatch.setenv("DUET_SASL_PASSWORD", "pw")
    monkeypatch.setenv("DUET_SASL_USERNAME", "svc")
    args = build_parser().parse_args(["cloud", "--checkpoint", "x.pt", "--security-protocol", "SASL_PLAINTEXT",
                                      "--sasl-mechanism", "SCRAM-SHA-256"])
    s = _security(args)
    assert (s.protocol, s.sasl_mechanism, s.username, s.password) == ("SASL_PLAINTEXT", "SCRAM-SHA-256", "svc", "pw")


@pytest.mark.parametrize("command", ["cloud", "devices"])
def test_long_running_commands_take_torch_threads(command, monkeypatch, capsys):
    """`duet cloud` and `duet devices` run torch on one thread unless told otherwise (`duet_bus.process`),
    and refuse a count below one before touching the broker or the checkpoint."""
    import torch

    from duet_bus import process
    from duet_bus.cli import build_parser, main

    assert build_parser().parse_args([command, "--checkpoint", "x.pt"]).torch_threads == 1
    assert build_parser().parse_args([command, "--checkpoint", "x.pt", "--torch-threads", "3"]).torch_threads == 3
    wanted = []
    monkeypatch.setattr(torch, "set_num_threads", wanted.append)  # this test process keeps its own
    process.set_torch_threads(3)
    assert wanted == [3]
    assert main([command, "--bootstrap", "127.0.0.1:1", "--checkpoint", "no-such.pt", "--torch-threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --torch-threads: must be a positive integer, got 0"
    assert wanted == [3]


def test_freezing_the_startup_heap_keeps_it_out_of_later_collections():
    import gc

    from duet_bus import process

    kept = [[i] for i in range(1000)]  # long-lived, as a process's start-up is
    try:
        process.freeze_startup_heap()
        assert gc.get_freeze_count() >= len(kept)
        collected = {id(o) for o in gc.get_objects()}  # the generations a collection walks
        assert not any(id(x) in collected for x in kept)
    finally:
        gc.unfreeze()
