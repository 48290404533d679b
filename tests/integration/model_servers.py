"""What the remote-reranker tests' model servers (infinity_server.py, kserve_server.py) share: a
virtualenv of each server's own that uv makes once, the server process run from it with its log and
stopped, ready once an HTTP URL answers; the model they serve and the tests' JSON client."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import DEFAULT_EMBEDDING_MODEL, Settings
from sidecar.embedding import resolve_model_source
from sidecar.processes import stop

# The sidecar tests' reranker_max_length: a server must cut pairs where the sidecar does.
MAX_LENGTH = 128
INSTALL_TIMEOUT_S = 1800.0
READY_TIMEOUT_S = 180.0
POLL_INTERVAL_S = 0.2
STOP_TIMEOUT_S = 15.0
LOG_TAIL_BYTES = 4000
HTTP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ModelServer:
    """One kind of server that the tests run from a virtualenv of its own."""

    # As its errors name it ("the Infinity server exited ..."); lower-cased, it begins its
    # progress lines and its temporary folders' names.
    name: str
    # Its virtualenv's folder under <cache_dir>/venvs.
    venv_name: str
    # What it raises when its virtualenv cannot be made or its server does not start.
    error: type[Exception]

    def venv(
        self,
        requirements: Sequence[str],
        *,
        exclude_newer: str | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> Path:
        """<cache_dir>/venvs/<venv_name> with `requirements` (resolved as PyPI had them at
        `exclude_newer`, an RFC 3339 time, when given), made (or remade, when these or this Python
        changed) with the uv beside this interpreter, its progress printed. A stamp written last
        marks a finished install; a lock keeps two test sessions from installing at once.
        Raises `error` (no uv) and CalledProcessError (uv failed)."""
        venv = Settings.from_env(environ).cache_dir / "venvs" / self.venv_name
        python = venv / "bin" / "python"
        stamp = venv / ".requirements"
        resolution = [] if exclude_newer is None else [exclude_newer]
        wanted = "\n".join([sys.version.split()[0], *resolution, *requirements]) + "\n"
        venv.parent.mkdir(parents=True, exist_ok=True)
        with (venv.parent / f"{venv.name}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if stamp.is_file() and stamp.read_text() == wanted:
                return venv
            uv = Path(sys.executable).with_name("uv")
            if not uv.is_file():
                raise self.error(f"no uv beside {sys.executable}: `make install` puts it there")
            label = f"{self.name.lower()} tests"
            print(f"{label}: installing {' '.join(requirements)} into {venv}", flush=True)
            started = time.monotonic()
            install = [str(uv), "pip", "install", "--python", str(python)]
            if exclude_newer is not None:
                install += ["--exclude-newer", exclude_newer]
            for command in (
                [str(uv), "venv", "--clear", "--quiet", "--python", sys.executable, str(venv)],
                [*install, *requirements],
            ):
                subprocess.run(command, env=dict(environ), check=True, timeout=INSTALL_TIMEOUT_S)
            stamp.write_text(wanted)
            print(f"{label}: installed in {time.monotonic() - started:.0f} s", flush=True)
        return venv

    @contextmanager
    def running(
        self, command: Sequence[str], *, url: str, ready_path: str, environ: Mapping[str, str]
    ) -> Iterator[None]:
        """`command` run with `environ`, stdin closed, in a temporary folder of its own (its
        working directory, where its output goes to server.log). Yields once GET
        {url}{ready_path} answers 200; stopped (SIGTERM, then SIGKILL after STOP_TIMEOUT_S) on
        exit. Raises `error` with the log's tail when the process exits first or is not ready
        within READY_TIMEOUT_S."""
        with tempfile.TemporaryDirectory(prefix=f"{self.name.lower()}-") as workdir:
            log_path = Path(workdir) / "server.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    command,
                    cwd=workdir,
                    env=dict(environ),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                self._wait_until_ready(process, url, ready_path, log_path)
                yield
            finally:
                stop(process, STOP_TIMEOUT_S)

    def _wait_until_ready(
        self, process: subprocess.Popen[bytes], url: str, ready_path: str, log: Path
    ) -> None:
        """Poll the readiness URL; fail at once if the process exits (a model it cannot load,
        port taken)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if (status := process.poll()) is not None:
                raise self.error(
                    f"the {self.name} server exited with {status}; log tail:\n{_tail(log)}"
                )
            try:
                with urllib.request.urlopen(f"{url}{ready_path}", timeout=1.0) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet: the model loads before the server binds
            if time.monotonic() >= deadline:
                raise self.error(
                    f"the {self.name} server at {url} was not ready within "
                    f"{READY_TIMEOUT_S:.0f} s; log tail:\n{_tail(log)}"
                )
            time.sleep(POLL_INTERVAL_S)


def _tail(log: Path) -> str:
    with log.open("rb") as file:
        file.seek(max(0, log.stat().st_size - LOG_TAIL_BYTES))
        return file.read().decode(errors="replace")


def install_uncaptured(pytestconfig: pytest.Config, install: Callable[[], object]) -> None:
    """`install` (a server's virtualenv) run with pytest's output capture off: a first install
    takes minutes, and its progress is shown as it goes, not held back until the test ends."""
    with pytestconfig.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        install()


def call_json(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """GET (no body) or POST `body` as JSON; the status and the decoded answer, errors (4xx, 5xx)
    included. Raises URLError when the server cannot be reached."""
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def build_sequence_classifier(target: Path, *, max_length: int, seed: int = 0) -> Path:
    """A cross-encoder in the shape model servers take, written to `target`: the bundled
    all-MiniLM-L6-v2 encoder under BERT's [CLS] pooler and a seeded one-logit classifier
    (`BertForSequenceClassification`), its tokenizer declaring `max_length` tokens (where both
    the server and the in-process runtime cut pairs).

    The classifier's weights are drawn with a standard deviation of 1, not BERT's 0.02: with 0.02
    the logits of unrelated pairs span 0.05 and their sigmoids all round to about 0.5, too flat
    for a comparison to catch pairs mixed up; with 1 they span several units."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = resolve_model_source(DEFAULT_EMBEDDING_MODEL)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)
    torch.nn.init.normal_(model.classifier.weight, std=1.0)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source, model_max_length=max_length).save_pretrained(target)
    return target
