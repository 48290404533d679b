"""The demo's comparison when the rerank stage failed open: the reason comes back, so the demo
says the right side is the first-stage order instead of calling it reranked."""

from typing import Any

import pytest

from sidecar import demo


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
