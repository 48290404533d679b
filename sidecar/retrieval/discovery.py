"""Profile resolution at request time: the configured profile of an index expression merged with
what its mapping shows, the mapping read once per TTL (and again after a mapping error).

A mapping read for a caller is read with that caller's identity and cached for that identity
only, so no caller learns through a profile (or an error naming fields) what the cluster would
not show them; the sidecar's own reads (the check at start) use its own identity."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping

from cachetools import TTLCache

from sidecar.config import ProfileConfig
from sidecar.retrieval.identity import fingerprint
from sidecar.retrieval.opensearch import Upstream
from sidecar.retrieval.profiles import (
    IndexProfile,
    MappingInfo,
    ProfileError,
    build_profile,
    match_profile,
)
from sidecar.retrieval.transport import UpstreamError

log = logging.getLogger(__name__)

_MAX_MAPPINGS = 1024


class ProfileResolver:
    def __init__(
        self,
        configs: Mapping[str, ProfileConfig],
        upstream: Upstream,
        *,
        local_model: str,
        local_dimensions: Mapping[str, int],
        allow_lexical_only: bool,
        mapping_ttl_s: float,
    ) -> None:
        self._configs = configs
        self._upstream = upstream
        self._local_model = local_model
        self._local_dimensions = local_dimensions
        self._allow_lexical_only = allow_lexical_only
        # Keyed by (index, identity fingerprint): an HMAC under a key of this process, so the
        # cache never holds a credential, nor anything to guess one from offline.
        self._mappings: TTLCache[tuple[str, str], MappingInfo] = TTLCache(
            _MAX_MAPPINGS, mapping_ttl_s
        )
        self._fingerprint_key = secrets.token_bytes(32)

    @property
    def cached_mappings(self) -> int:
        return len(self._mappings)

    async def resolve(
        self,
        index: str,
        headers: Mapping[str, str] | None = None,
        *,
        need_vector: bool = True,
    ) -> IndexProfile:
        """The profile searches of `index` use, its mapping read with the identity `headers`
        (None: the sidecar's own); `need_vector` false: only its rerank part is wanted, so a
        missing vector field is no error. Raises ProfileError (the profile cannot work for this
        index) and UpstreamError (e.g. OpenSearch's own 404, or 403 for this caller)."""
        return self._build(index, await self._mapping(index, headers), need_vector=need_vector)

    async def for_write(
        self, index: str, headers: Mapping[str, str] | None = None
    ) -> IndexProfile | None:
        """The profile of a write target when its documents get vectors here, else None (the write
        passes through). An index (or data stream) that does not exist yet is judged by the
        mapping the cluster's index templates would give it, else by a configured profile naming
        its vector field. Raises ProfileError only for a profile configured to embed on write
        that cannot work (the write would otherwise go without its vector)."""
        configured = match_profile(self._configs, index)
        try:
            mapping: MappingInfo | None = await self._mapping(index, headers)
        except UpstreamError as error:
            if error.status != 404:
                raise
            mapping = await self._templated_mapping(index, headers)
            if mapping is None and (configured is None or configured[1].vector.field is None):
                return None
        try:
            profile = self._build(index, mapping, need_vector=False)
        except ProfileError:
            if configured is not None and configured[1].embed_on_write:
                raise
            return None
        return profile if profile.embed_on_write else None

    async def write_index(self, name: str, headers: Mapping[str, str] | None = None) -> str:
        """The concrete index a single-document write to `name` lands in: an alias's write index
        (its only index when it has one), else `name` itself. Read afresh every time, since a
        rollover moves it; when the cluster will not say, `name` (the cluster then answers for
        it as it would without the sidecar)."""
        try:
            aliases = await self._upstream.aliases(name, headers)
        except UpstreamError:
            return name
        holders = [index for index, entry in aliases.items() if name in entry.get("aliases", {})]
        for index in holders:
            if aliases[index]["aliases"][name].get("is_write_index") is True:
                return index
        return holders[0] if len(holders) == 1 else name

    def invalidate(self, index: str) -> None:
        """Forget the mapping of `index`, for every identity (the cluster refused a query built
        from it: it may have changed)."""
        for key in [key for key in self._mappings if key[0] == index]:
            self._mappings.pop(key, None)

    async def check_configured(self) -> None:
        """At start: every profile configured for an exact index name that exists must agree with
        its mapping. Raises ProfileError naming both sides (patterns, and indexes that do not
        exist or cannot be read yet, are checked on first use)."""
        for name in self._configs:
            if any(c in name for c in "*?[,"):
                continue
            try:
                await self.resolve(name)
            except UpstreamError as error:
                # Not there yet, or the cluster not reachable: checked again on first use.
                log.warning(
                    "profile for index %r not checked against its mapping (OpenSearch answered %s)",
                    name,
                    error.status,
                )

    async def _mapping(self, index: str, headers: Mapping[str, str] | None) -> MappingInfo:
        key = (index, "sidecar" if headers is None else fingerprint(self._fingerprint_key, headers))
        if (cached := self._mappings.get(key)) is not None:
            return cached
        mapping = MappingInfo.from_response(await self._upstream.mapping(index, headers))
        self._mappings[key] = mapping
        return mapping

    async def _templated_mapping(
        self, index: str, headers: Mapping[str, str] | None
    ) -> MappingInfo | None:
        """What the templates would map a new `index` as (the first write creates it, as a
        rollover's new generation or a data stream's first backing index); None when no template
        matches or this identity may not ask."""
        try:
            simulated = await self._upstream.simulate_index(index, headers)
        except UpstreamError as error:
            log.debug("no template mapping for new index %r (answered %s)", index, error.status)
            return None
        mappings = simulated.get("template", {}).get("mappings")
        if not isinstance(mappings, dict) or not mappings.get("properties"):
            return None
        return MappingInfo.from_response({index: {"mappings": mappings}})

    def _build(
        self, index: str, mapping: MappingInfo | None, *, need_vector: bool = True
    ) -> IndexProfile:
        return build_profile(
            index,
            match_profile(self._configs, index),
            mapping,
            local_model=self._local_model,
            local_dimensions=self._local_dimensions,
            allow_lexical_only=self._allow_lexical_only or not need_vector,
        )
