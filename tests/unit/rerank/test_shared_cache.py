"""The shared score cache's pure parts: its keys, its value format, its back-off, and the settings
and start-up checks around it (the Redis behaviour itself is tested against a real Redis)."""

from __future__ import annotations

import asyncio
import math
import sys

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from sidecar.app import shared_score_cache
from sidecar.config import Settings, SettingsError
from sidecar.documents import DocKey
from sidecar.metrics import Metrics
from sidecar.rerank.cache import ScoreCache
from sidecar.rerank.shared_cache import (
    KEY_PREFIX,
    Backoff,
    SharedScoreCache,
    decode_score,
    encode_score,
    shared_key,
)
from tests.unit.rerank.test_cache import FakeTimer

MODEL = "cross-encoder/ms-marco-MiniLM-L-6-v2@rev1|first"
PASSWORD = "s3cret-pa55"
D1 = DocKey("docs-000001", "d1")


def test_keys_are_prefixed_hashes_that_differ_in_every_part_and_hide_the_query() -> None:
    base = ScoreCache.key(MODEL, "What is BM25?", D1, "BM25 ranks...")
    variants = [
        ScoreCache.key("other-model@rev1|first", "What is BM25?", D1, "BM25 ranks..."),
        ScoreCache.key(MODEL.replace("first", "max_chunk"), "What is BM25?", D1, "BM25 ranks..."),
        ScoreCache.key(MODEL, "What is TF-IDF?", D1, "BM25 ranks..."),
        ScoreCache.key(MODEL, "What is BM25?", DocKey("docs-000001", "d2"), "BM25 ranks..."),
        ScoreCache.key(MODEL, "What is BM25?", DocKey("docs-000002", "d1"), "BM25 ranks..."),
        ScoreCache.key(MODEL, "What is BM25?", D1, "BM25 ranks, updated"),
    ]
    key = shared_key(base)
    assert key != shared_key(ScoreCache.key(MODEL, "what is bm25?", D1, "BM25 ranks..."))
    assert key.startswith(KEY_PREFIX)
    assert len(key) == len(KEY_PREFIX) + 32
    assert "bm25" not in key.lower()
    assert len({key, *(shared_key(variant) for variant in variants)}) == 1 + len(variants)


def test_a_key_part_holding_the_separator_cannot_pass_for_another_key() -> None:
    assert shared_key(("m", "a|b", "c", "d")) != shared_key(("m|a", "b", "c", "d"))


@pytest.mark.parametrize("score", [0.0, -0.0, 1.5, -7.123456789012345, 1e-300, 3.4e38, math.inf])
def test_scores_read_back_exactly(score: float) -> None:
    decoded = decode_score(encode_score(score))
    assert decoded == score
    assert math.copysign(1.0, decoded) == math.copysign(1.0, score)


def test_a_missing_or_unreadable_value_is_a_miss() -> None:
    assert decode_score(None) is None
    assert decode_score(b"not a float") is None
    nan = decode_score(encode_score(math.nan))
    assert nan is not None
    assert math.isnan(nan), "NaN too reads back as itself, not as a miss"


def test_after_a_failure_calls_are_skipped_for_the_backoff_then_tried_again() -> None:
    timer = FakeTimer()
    backoff = Backoff(2.0, timer)
    assert backoff.allows_call()
    assert backoff.failed() is True, "an outage begins"
    timer.now += 1.9
    assert not backoff.allows_call()
    timer.now += 0.1
    assert backoff.allows_call()
    assert backoff.failed() is False, "the same outage goes on"
    timer.now += 1.0
    assert not backoff.allows_call(), "each failure restarts the back-off"
    timer.now += 1.0
    assert backoff.succeeded() is True, "the outage ends"
    assert backoff.succeeded() is False
    assert backoff.allows_call()


def test_the_cache_url_is_a_secret_masked_wherever_settings_are_shown() -> None:
    settings = Settings.from_env(
        {
            "SIDECAR_SCORE_CACHE_URL": f"rediss://cache-user:{PASSWORD}@redis.internal:6380/2",
            "SIDECAR_SCORE_CACHE_TIMEOUT_S": "0.1",
        }
    )
    assert settings.score_cache_url is not None
    assert PASSWORD in settings.score_cache_url.get_secret_value()
    assert settings.score_cache_timeout_s == 0.1
    assert settings.redacted()["score_cache_url"] == "rediss://***@redis.internal:6380/2"
    assert PASSWORD not in str(settings.redacted())
    assert PASSWORD not in repr(settings)
    assert Settings().redacted()["score_cache_url"] is None


def test_a_password_given_as_a_url_parameter_is_masked_too() -> None:
    settings = Settings(score_cache_url=SecretStr(f"redis://redis:6379/0?password={PASSWORD}&x=1"))
    assert settings.redacted()["score_cache_url"] == "redis://redis:6379/0?password=***&x=1"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"score_cache_url": SecretStr("http://redis:6379")}, "redis:// or rediss://"),
        ({"score_cache_timeout_s": 0.0}, "SIDECAR_SCORE_CACHE_TIMEOUT_S must be positive"),
    ],
)
def test_unusable_shared_cache_settings_are_refused(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings(**values)  # type: ignore[arg-type]


def test_without_a_url_there_is_no_shared_cache() -> None:
    assert shared_score_cache(Settings(), Metrics(CollectorRegistry())) is None


def test_a_url_without_the_redis_package_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [name for name in sys.modules if name.partition(".")[0] == "redis"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "sidecar.rerank.shared_cache")
    monkeypatch.setitem(sys.modules, "redis", None)
    settings = Settings(score_cache_url=SecretStr("redis://redis:6379/0"))
    with pytest.raises(SettingsError, match=r"needs the redis package.*\[redis\]"):
        shared_score_cache(settings, Metrics(CollectorRegistry()))


def test_a_url_redis_cannot_parse_is_refused_without_its_password() -> None:
    settings = Settings(score_cache_url=SecretStr(f"redis://:{PASSWORD}@redis:port/0"))
    with pytest.raises(SettingsError, match="is not a valid Redis URL") as refused:
        shared_score_cache(settings, Metrics(CollectorRegistry()))
    assert PASSWORD not in str(refused.value)


def test_a_valid_url_makes_a_cache_that_connects_only_when_used() -> None:
    settings = Settings(score_cache_url=SecretStr("redis://127.0.0.1:1/0"))
    cache = shared_score_cache(settings, Metrics(CollectorRegistry()))
    assert isinstance(cache, SharedScoreCache)
    asyncio.run(cache.close())
