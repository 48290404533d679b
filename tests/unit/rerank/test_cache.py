import pytest

from sidecar.documents import DocKey
from sidecar.rerank.cache import CacheKey, ScoreCache, content_hash

MODEL = "cross-encoder/ms-marco-MiniLM-L-6-v2@rev1"


class FakeTimer:
    """A clock the test moves by hand, so TTL expiry needs no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_cache(max_entries: int = 100, ttl_s: float = 60.0) -> tuple[ScoreCache, FakeTimer]:
    timer = FakeTimer()
    return ScoreCache(max_entries=max_entries, ttl_s=ttl_s, timer=timer), timer


def key(
    query: str = "what is bm25",
    doc_id: str = "d1",
    text: str = "BM25 ranks...",
    model: str = MODEL,
    index: str = "docs",
) -> CacheKey:
    return ScoreCache.key(model, query, DocKey(index, doc_id), text)


@pytest.mark.parametrize(
    ("query", "variant"),
    [
        ("Apple stock", "apple stock"),  # a cased model (XLM-R based) scores these apart
        ("what is bm25", "  what   is\tbm25\n"),  # byte-level BPE keeps whitespace as tokens
        ("\uff22\uff2d\uff12\uff15", "BM25"),  # fullwidth: folded only by some tokenizers
        ("Stra\u00dfe", "strasse"),
        ("caf\u00e9", "cafe\u0301"),  # composed and decomposed accent
    ],
)
def test_queries_are_keyed_exactly_as_sent(query: str, variant: str) -> None:
    cache, _ = make_cache()
    cache.put_many([key(query=query)], [0.75])
    assert cache.get_many([key(query=variant)]) == [None]
    cache.put_many([key(query=variant)], [0.25])
    assert cache.get_many([key(query=query), key(query=variant)]) == [0.75, 0.25]


def test_content_hash_is_stable_and_sensitive_to_any_change() -> None:
    assert content_hash("some text") == content_hash("some text")
    assert content_hash("some text") != content_hash("some text.")
    assert content_hash("some text") != content_hash("Some text")


@pytest.mark.parametrize(
    "other",
    [
        key(model="cross-encoder/ms-marco-MiniLM-L-6-v2@rev2"),
        key(doc_id="d2"),
        key(index="docs-000002"),  # the same id in another index is another document
        key(text="BM25 ranks... (edited)"),
        key(query="what is tf-idf"),
    ],
    ids=["model", "doc-id", "index", "content", "query"],
)
def test_keys_differ_by_model_document_content_and_query(other: tuple[str, ...]) -> None:
    cache, _ = make_cache()
    cache.put_many([key()], [0.5])
    assert other != key()
    assert cache.get_many([other]) == [None]
    assert cache.get_many([key()]) == [0.5]


def test_changed_document_text_is_a_miss_until_rescored() -> None:
    cache, _ = make_cache()
    old, new = key(text="version one"), key(text="version two")
    cache.put_many([old], [0.1])
    assert cache.get_many([new]) == [None]
    cache.put_many([new], [0.9])
    assert cache.get_many([old, new]) == [0.1, 0.9]


def test_get_many_aligns_results_with_keys_including_misses_and_repeats() -> None:
    cache, _ = make_cache()
    a, b, c = key(doc_id="a"), key(doc_id="b"), key(doc_id="c")
    cache.put_many([a, c], [1.0, 3.0])
    assert cache.get_many([c, b, a, c]) == [3.0, None, 1.0, 3.0]
    assert cache.get_many([]) == []


def test_put_many_stores_each_score_under_its_own_key() -> None:
    cache, _ = make_cache()
    keys = [key(doc_id=str(i)) for i in range(5)]
    cache.put_many(keys, [float(i) for i in range(5)])
    assert cache.get_many(keys) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert len(cache) == 5


def test_put_many_overwrites_an_existing_score() -> None:
    cache, _ = make_cache()
    cache.put_many([key()], [0.2])
    cache.put_many([key()], [0.8])
    assert cache.get_many([key()]) == [0.8]
    assert len(cache) == 1


def test_put_many_refuses_mismatched_lengths() -> None:
    cache, _ = make_cache()
    with pytest.raises(ValueError, match="zip"):
        cache.put_many([key(doc_id="a"), key(doc_id="b")], [1.0])


def test_zero_scores_are_hits_not_misses() -> None:
    cache, _ = make_cache()
    cache.put_many([key()], [0.0])
    assert cache.get_many([key()]) == [0.0]


def test_lru_bound_evicts_the_least_recently_used_entry() -> None:
    cache, _ = make_cache(max_entries=3)
    a, b, c, d = (key(doc_id=name) for name in "abcd")
    cache.put_many([a, b, c], [1.0, 2.0, 3.0])
    # Reading a makes b the least recently used.
    assert cache.get_many([a]) == [1.0]
    cache.put_many([d], [4.0])
    assert len(cache) == 3
    assert cache.get_many([b]) == [None]
    assert cache.get_many([a, c, d]) == [1.0, 3.0, 4.0]


def test_lru_bound_without_reads_evicts_in_insertion_order() -> None:
    cache, _ = make_cache(max_entries=2)
    keys = [key(doc_id=str(i)) for i in range(4)]
    cache.put_many(keys, [0.0, 1.0, 2.0, 3.0])
    assert len(cache) == 2
    assert cache.get_many(keys) == [None, None, 2.0, 3.0]


def test_entries_expire_after_ttl() -> None:
    cache, timer = make_cache(ttl_s=60.0)
    cache.put_many([key()], [0.5])
    timer.now += 59.9
    assert cache.get_many([key()]) == [0.5]
    timer.now += 0.2
    assert cache.get_many([key()]) == [None]
    assert len(cache) == 0


def test_ttl_is_counted_from_the_last_write_not_the_last_read() -> None:
    cache, timer = make_cache(ttl_s=10.0)
    cache.put_many([key(doc_id="old")], [1.0])
    timer.now += 6.0
    cache.put_many([key(doc_id="new")], [2.0])
    # A read does not extend the lifetime of "old".
    assert cache.get_many([key(doc_id="old")]) == [1.0]
    timer.now += 6.0
    assert cache.get_many([key(doc_id="old"), key(doc_id="new")]) == [None, 2.0]


def test_rewriting_an_entry_renews_its_ttl() -> None:
    cache, timer = make_cache(ttl_s=10.0)
    cache.put_many([key()], [1.0])
    timer.now += 8.0
    cache.put_many([key()], [1.5])
    timer.now += 8.0
    assert cache.get_many([key()]) == [1.5]
