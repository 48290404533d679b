"""A real Redis server for the shared score cache's integration tests: one process on a free
127.0.0.1 port, persistence off, that a test can kill, freeze and start again on the same port."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import redis

from sidecar.processes import stop
from tests.integration.processes import find_binary, free_port

INSTALL_HINT = (
    "install the Debian/Ubuntu package 'redis-server' (`make redis-bin` does it as root, or "
    "`apt-get install redis-server`), or set REDIS_SERVER_BIN to a redis-server binary"
)
READY_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.05
STOP_TIMEOUT_S = 10.0


class RedisServerError(RuntimeError):
    """redis-server is missing or did not answer PING in time."""


def find_redis_server(environ: Mapping[str, str] = os.environ) -> Path:
    """REDIS_SERVER_BIN, else `redis-server` on PATH, else Debian's. Raises RedisServerError."""
    return find_binary("REDIS_SERVER_BIN", "redis-server", INSTALL_HINT, RedisServerError, environ)


class RunningRedis:
    """redis-server on a free port with its config (password included, so it is not on the
    command line) and log under `workdir`; no RDB snapshots, no AOF: a restart comes back empty.
    Started by the constructor, which returns once PING is answered."""

    def __init__(self, binary: Path, workdir: Path, password: str | None = None) -> None:
        self.binary = binary
        self.port = free_port()
        self.password = password
        self.log_path = workdir / "redis.log"
        self.config_path = workdir / "redis.conf"
        workdir.mkdir(parents=True, exist_ok=True)
        settings = [
            "bind 127.0.0.1",
            f"port {self.port}",
            'save ""',
            "appendonly no",
            f"dir {workdir}",
            f"logfile {self.log_path}",
        ]
        if password is not None:
            settings.append(f"requirepass {password}")
        self.config_path.write_text("\n".join(settings) + "\n")
        self._process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        credentials = f":{self.password}@" if self.password is not None else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (again, on the same port) and wait for PING."""
        self._process = subprocess.Popen(
            [str(self.binary), str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if (status := self._process.poll()) is not None:
                raise RedisServerError(f"redis-server exited with {status}; see {self.log_path}")
            try:
                with self.client() as client:
                    client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() >= deadline:
                    raise RedisServerError(
                        f"redis-server did not answer PING within {READY_TIMEOUT_S:.0f} s; "
                        f"see {self.log_path}"
                    ) from None
                time.sleep(POLL_INTERVAL_S)

    def client(self) -> redis.Redis:
        """A synchronous client, for the test's own looks at what is stored."""
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def kill(self) -> None:
        """SIGKILL: the server is gone without closing its connections politely."""
        assert self._process is not None
        self._process.kill()
        self._process.wait(timeout=STOP_TIMEOUT_S)
        self._process = None

    def freeze(self) -> None:
        """SIGSTOP: the port still accepts connections (the kernel does), nothing answers."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.send_signal(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
        stop(self._process, STOP_TIMEOUT_S)
        self._process = None

    def __enter__(self) -> RunningRedis:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
