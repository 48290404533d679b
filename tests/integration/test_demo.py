"""`make demo` as a new user runs it, then the commands it prints to go on, run as printed from the
checkout: serve in the background until ready, the native and the intercepted search, provenance,
Ctrl-C, and the node stopped and purged."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.config import ENV_PREFIX, LocalNodeSettings, Settings
from sidecar.demo import NEXT_STEPS
from sidecar.local_opensearch.node import LocalNode
from tests.integration.processes import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# The demo's own node, apart from the suite's (9250, 9260): the printed last step deletes it.
DEMO_PORT = 9298
# The demo loads and embeds its corpus and starts the sidecar twice, on a small CPU box.
DEMO_TIMEOUT_S = 900.0
READY_DEADLINE_S = 300.0
EXIT_DEADLINE_S = 90.0
# Where a machine keeps its downloads and its JDK: the demo's node uses the suite's.
KEPT_SETTINGS = ("SIDECAR_CACHE_DIR", "SIDECAR_OPENSEARCH_JAVA_HOME")


@pytest.fixture
def environ() -> dict[str, str]:
    """A new user's shell: no SIDECAR_* settings but the machine's download cache and JDK; the
    sidecar on a free port (8080 may be taken here), a small heap for the extra node."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) or k in KEPT_SETTINGS
    } | {"SIDECAR_LISTEN_PORT": str(free_port()), "SIDECAR_OPENSEARCH_HEAP": "512m"}


@pytest.fixture
def demo_node(environ: dict[str, str]) -> Iterator[LocalNode]:
    """The node `make demo` starts (`sidecar opensearch up --port`), purged afterwards whatever
    the test got to."""
    node = LocalNode(
        LocalNodeSettings(port=DEMO_PORT), Settings.from_env(environ).cache_dir, environ
    )
    try:
        yield node
    finally:
        node.down()
        if node.home.exists():
            node.purge()


def steps_printed(output: str) -> list[str]:
    """The command lines of the block the demo ends with, in order (comments left out)."""
    block = output[output.index(NEXT_STEPS) :].splitlines()[1:]
    return [line.strip() for line in block if line.strip() and not line.strip().startswith("#")]


def shell(command: str, environ: dict[str, str], timeout_s: float = 300.0) -> str:
    completed = subprocess.run(
        ["bash", "-c", command],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert completed.returncode == 0, (command, completed.stdout, completed.stderr)
    return completed.stdout


def wait_until_ready(server: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"serve exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as ready:
                if ready.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # the models load before the listener opens
        time.sleep(0.5)
    pytest.fail(f"not ready within {READY_DEADLINE_S} s:\n{log.read_text()}")


def test_the_commands_the_demo_prints_work_as_printed(
    environ: dict[str, str], demo_node: LocalNode, tmp_path: Path
) -> None:
    upstream = f"http://127.0.0.1:{DEMO_PORT}"
    shell(f"{sys.executable} -m sidecar opensearch up --port {DEMO_PORT}", environ)
    output = shell(
        f"{sys.executable} -m sidecar demo --opensearch {upstream}", environ, DEMO_TIMEOUT_S
    )
    assert "distinct sections of Python's reference documentation" in output
    assert "found by" in output, "the reranked order beside the first stage's"
    commands = steps_printed(output)

    serve = next(c for c in commands if " serve " in c)
    assert f"--opensearch {upstream}" in serve
    assert serve.startswith("SIDECAR_RERANKER_MODEL=")
    listen_port = shlex.split(serve)[shlex.split(serve).index("--listen-port") + 1]
    url = f"http://127.0.0.1:{listen_port}"
    log = tmp_path / "serve.log"
    with log.open("wb") as server_output:
        # In a process group of its own, as a terminal's foreground job is.
        server = subprocess.Popen(
            ["bash", "-c", serve],
            cwd=REPO,
            env=environ,
            stdout=server_output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_ready(server, url, log)
        native, intercepted = (
            json.loads(shell(c, environ)) for c in commands if c.startswith("curl -s -X POST")
        )
        assert native["rerank"]["applied"] is True, "reranked within the request's time budget"
        texts = [hit["source"]["text"] for hit in native["hits"]]
        assert len(texts) == 5
        assert len(set(texts)) == len(texts), "no passage twice"
        assert intercepted["ext"]["rerank"]["applied"] is True, "reranked within the time budget"
        assert [set(hit["_source"]) for hit in intercepted["hits"]["hits"]] == [{"title"}] * 5
        assert all("_rerank" in hit for hit in intercepted["hits"]["hits"])

        provenance = shell(next(c for c in commands if " provenance " in c), environ)
        assert "Final top-k hits: 5, of native searches" in provenance
        assert "Intercepted _search + ext.rerank answers: 1," in provenance

        os.killpg(server.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground job
        assert server.wait(timeout=EXIT_DEADLINE_S) == 0, log.read_text()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    purge = next(c for c in commands if c.endswith("--purge"))
    assert f"--port {DEMO_PORT}" in purge
    purged = shell(purge, environ)
    assert "stopped" in purged
    assert f"removed {demo_node.home}" in purged
    assert not demo_node.home.exists()

    # Needing a human (an hour of training) or deleting what the rest of the suite uses: checked
    # for what they name, not run.
    train = next((c for c in commands if " train-reranker " in c), None)
    if train is not None:
        arguments = shlex.split(train)
        assert (
            REPO / arguments[arguments.index("--dataset") + 1] / "qrels" / "train.tsv"
        ).is_file()
    assert f"rm -rf {Settings.from_env(environ).cache_dir}" in commands
    handled = {serve, purge, train, f"rm -rf {Settings.from_env(environ).cache_dir}", "make clean"}
    queries = {c for c in commands if c.startswith("curl -s -X POST") or " provenance " in c}
    assert set(commands) - handled - queries == set(), "every printed command is checked"
