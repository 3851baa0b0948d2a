import subprocess
import sys
import time

from duet_bus.broker import EmbeddedBroker, _answers


def test_broker_starts_answers_and_stops():
    with EmbeddedBroker() as broker:
        assert broker.bootstrap.startswith("127.0.0.1:")
        assert _answers(broker.port)
        process = broker.process
    assert process.poll() is not None  # stopped with the context


def test_sigterm_to_duet_broker_stops_the_broker_process():
    proc = subprocess.Popen([sys.executable, "-m", "duet_bus.cli", "broker"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        port = int(line.split("127.0.0.1:")[1].split(";")[0].split()[0])
        assert _answers(port)
        proc.terminate()
        proc.wait(timeout=15)
        deadline = time.monotonic() + 10
        while _answers(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _answers(port), "the broker outlived `duet broker`"
    finally:
        proc.kill()
