"""What names one document everywhere in the request path: the concrete index it lives in and its id.

An alias, a wildcard or a data stream spans several indexes, and an id is unique only within one
of them (a rollover or a blue/green reindex keeps ids), so `_id` alone would merge distinct
documents. Shared by both stages and the write path, below all of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True, slots=True)
class DocKey:
    """(concrete index, `_id`): ordered and hashable, so it keys dicts and breaks sort ties."""

    index: str
    id: str
