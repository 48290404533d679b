"""ProfileResolver: mappings read once per TTL and again after invalidation; profiles of exact
index names checked at start. The cluster is a fake here (pure logic)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.config import parse_profiles
from sidecar.retrieval.discovery import ProfileResolver
from sidecar.retrieval.profiles import ProfileError
from sidecar.retrieval.transport import UpstreamError, error_body

MAPPING = {
    "mappings": {
        "properties": {
            "body": {"type": "text"},
            "vec": {"type": "knn_vector", "dimension": 4},
        }
    }
}


class FakeUpstream:
    def __init__(self, status: int | None = None, templates: dict[str, Any] | None = None) -> None:
        self.calls: list[str] = []
        self.identities: list[Any] = []
        self.status = status
        # Index-name prefix -> the mappings its template gives a new index.
        self.templates = templates or {}

    async def aliases(self, name: str, headers: Any = None) -> dict[str, Any]:
        held = {
            "rolled": {
                "rolled-000001": {"aliases": {"rolled": {"is_write_index": False}}},
                "rolled-000002": {"aliases": {"rolled": {"is_write_index": True}}},
            },
            "single": {"single-000001": {"aliases": {"single": {}}}},
            "read-only": {"a": {"aliases": {"read-only": {}}}, "b": {"aliases": {"read-only": {}}}},
        }
        if headers == {"authorization": "Basic writer"}:
            raise UpstreamError(403, error_body(403, "security_exception", "no permissions"))
        if name not in held:
            raise UpstreamError(404, error_body(404, "aliases_not_found_exception", name))
        return held[name]

    async def simulate_index(self, index: str, headers: Any = None) -> dict[str, Any]:
        if headers == {"authorization": "Basic writer"}:  # may write, may not read templates
            raise UpstreamError(403, error_body(403, "security_exception", "no permissions"))
        for prefix, mappings in self.templates.items():
            if index.startswith(prefix):
                return {"template": {"settings": {}, "mappings": mappings}, "overlapping": []}
        return {"overlapping": []}

    async def mapping(self, index: str, headers: Any = None) -> dict[str, Any]:
        self.calls.append(index)
        self.identities.append(headers)
        if headers == {"authorization": "Basic outsider"}:
            raise UpstreamError(403, error_body(403, "security_exception", "no permissions"))
        if self.status is not None:
            raise UpstreamError(self.status, error_body(self.status, "x", "refused"))
        if index != "docs":
            raise UpstreamError(404, error_body(404, "index_not_found_exception", index))
        return {"docs": MAPPING}


def resolver(upstream: FakeUpstream, tables: dict[str, Any] | None = None) -> ProfileResolver:
    return ProfileResolver(
        parse_profiles(tables or {}),
        upstream,  # type: ignore[arg-type]
        local_model="m",
        local_dimensions={"m": 4},
        allow_lexical_only=False,
        mapping_ttl_s=60,
    )


def test_a_mapping_is_read_once_and_again_after_invalidation() -> None:
    upstream = FakeUpstream()
    profiles = resolver(upstream)

    async def run() -> None:
        first = await profiles.resolve("docs")
        assert (first.vector_field, first.lexical_fields) == ("vec", ("body",))
        await profiles.resolve("docs")
        assert upstream.calls == ["docs"]
        profiles.invalidate("docs")
        await profiles.resolve("docs")
        assert upstream.calls == ["docs", "docs"]

    asyncio.run(run())


def test_unknown_index_is_the_clusters_own_404() -> None:
    with pytest.raises(UpstreamError) as refused:
        asyncio.run(resolver(FakeUpstream()).resolve("absent"))
    assert refused.value.status == 404


def test_a_mismatching_profile_is_refused_at_start() -> None:
    profiles = resolver(FakeUpstream(), {"docs": {"vector": {"field": "body"}}})
    with pytest.raises(ProfileError, match=r"'body'.*vec \(knn_vector, dimension 4\)"):
        asyncio.run(profiles.check_configured())


def test_start_does_not_depend_on_the_cluster_answering() -> None:
    profiles = resolver(FakeUpstream(status=502), {"docs": {}, "logs-*": {}})
    asyncio.run(profiles.check_configured())  # checked again on first use


def test_writes_to_a_missing_index_embed_only_with_a_configured_vector_field() -> None:
    assert asyncio.run(resolver(FakeUpstream()).for_write("new")) is None
    configured = resolver(
        FakeUpstream(),
        {"new": {"vector": {"field": "vec"}, "embed_on_write": True, "lexical": {"fields": ["b"]}}},
    )
    profile = asyncio.run(configured.for_write("new"))
    assert profile is not None
    assert (profile.vector_field, profile.embed_on_write) == ("vec", True)


def test_writes_to_a_missing_index_embed_as_its_template_would_map_it() -> None:
    # A data stream's first write, or a rollover's next generation, creates the index from a
    # template whose mapping asks for vectors on write.
    mappings = {**MAPPING["mappings"], "_meta": {"sidecar": {"embed_on_write": True}}}
    upstream = FakeUpstream(templates={"logs-": mappings, "plain-": {"properties": {}}})
    profiles = resolver(upstream)
    profile = asyncio.run(profiles.for_write("logs-web"))
    assert profile is not None
    assert (profile.vector_field, profile.embed_on_write) == ("vec", True)
    assert asyncio.run(profiles.for_write("plain-1")) is None, "a template without fields"
    assert asyncio.run(profiles.for_write("other")) is None, "no template matches"
    writer = {"authorization": "Basic writer"}
    assert asyncio.run(profiles.for_write("logs-web", writer)) is None, (
        "a writer who may not read the templates gets the write passed through, as without them"
    )


@pytest.mark.parametrize(
    ("name", "headers", "lands_in"),
    [
        ("rolled", None, "rolled-000002"),  # the alias's write index
        ("single", None, "single-000001"),  # an alias's only index writes implicitly
        ("read-only", None, "read-only"),  # no write index: the cluster refuses it itself
        ("docs", None, "docs"),  # a concrete index
        ("rolled", {"authorization": "Basic writer"}, "rolled"),  # may not read aliases
    ],
)
def test_a_write_lands_in_the_write_index_of_an_alias(
    name: str, headers: dict[str, str] | None, lands_in: str
) -> None:
    assert asyncio.run(resolver(FakeUpstream()).write_index(name, headers)) == lands_in


def test_a_mapping_read_for_one_caller_is_never_served_to_another() -> None:
    upstream = FakeUpstream()
    profiles = resolver(upstream)
    reader = {"authorization": "Basic reader"}

    async def run() -> None:
        await profiles.resolve("docs", reader)
        await profiles.resolve("docs", reader)
        assert upstream.identities == [reader], "cached for the same identity"
        with pytest.raises(UpstreamError) as refused:
            await profiles.resolve("docs", {"authorization": "Basic outsider"})
        assert refused.value.status == 403, "the cluster's own answer for this caller"
        await profiles.resolve("docs")
        assert upstream.identities[-1] is None, "the sidecar's own read is its own entry"
        profiles.invalidate("docs")
        await profiles.resolve("docs", reader)
        assert len(upstream.calls) == 4, "invalidation forgets every identity's entry"

    asyncio.run(run())
