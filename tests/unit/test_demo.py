"""The demo when the rerank stage failed open: the reason comes back, so the demo says the right
side is the first-stage order instead of calling it reranked, and the serve step it prints gets
a budget the rerank fits in; a sidecar that does not exit after SIGTERM is stopped, not waited on
forever nor crashed over."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sidecar import demo
from sidecar.config import Settings


def answer(fail_open: bool) -> dict[str, Any]:
    hit = {
        "id": "d1",
        "score": 0.9,
        "rerank_score": None if fail_open else 1.5,
        "source": {"title": "Exceptions"},
        "first_stage": {"rank": 1, "score": 0.9},
        "sources": {"lexical": {"rank": 1, "score": 8.4}, "vector": None},
    }
    return {
        "took": 10008,
        "candidates": 50,
        "timings_ms": {"rerank": 9388.0},
        "hits": [hit],
        "rerank": {
            "applied": not fail_open,
            "model": "stand-in",
            "device": "cpu",
            "dtype": "float32",
            "fail_open": fail_open,
            "reason": "deadline" if fail_open else None,
        },
    }


@pytest.mark.parametrize(("fail_open", "reason"), [(True, "deadline"), (False, None)])
def test_the_comparison_returns_why_the_rerank_stage_failed_open(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fail_open: bool,
    reason: str | None,
) -> None:
    monkeypatch.setattr(demo, "_post", lambda command: answer(fail_open))
    assert demo._compare("http://127.0.0.1:1", "demo") == reason
    assert "Exceptions" in capsys.readouterr().out


@pytest.mark.parametrize("slow_cpu", [True, False])
def test_the_printed_serve_step_gets_a_larger_budget_only_where_the_rerank_ran_out_of_it(
    tmp_path: Path, slow_cpu: bool
) -> None:
    settings = Settings(cache_dir=tmp_path, opensearch_url="http://127.0.0.1:1")
    steps = demo.next_steps(settings, "demo", "/models/stand-in", True, slow_cpu)
    serve = next(line.strip() for line in steps.splitlines() if line.strip().startswith("SIDECAR_"))
    assert ("SIDECAR_REQUEST_TIMEOUT_S=30 " in serve) is slow_cpu
    assert serve.startswith("SIDECAR_RERANKER_MODEL=/models/stand-in ")
    assert " serve --opensearch http://127.0.0.1:1 " in serve


def test_a_sidecar_still_busy_after_its_grace_is_killed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ignores_sigterm = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", ignores_sigterm], stdout=subprocess.PIPE)
    assert server.stdout is not None
    assert server.stdout.readline() == b"ready\n", "SIGTERM is ignored from here on"
    demo._stop(server, 0.2, tmp_path / "demo-sidecar.log")
    server.stdout.close()
    assert server.returncode == -9, "killed once the grace had passed"
    assert "the demo killed it" in capsys.readouterr().out
