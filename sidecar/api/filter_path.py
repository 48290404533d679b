"""OpenSearch's `filter_path` URL parameter, applied by the sidecar itself to the reranked `_search`
response (the cluster cannot filter it: the reranker needs every hit's id, score and text)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

# One filter's property-name patterns, outermost first.
Path = tuple[str, ...]

# What Java's String.trim() strips (OpenSearch trims each filter with it): every char up to space.
_JAVA_TRIMMED = "".join(map(chr, range(0x21)))
# JSON null is a value that can be kept, so a value filtered away is told apart by identity.
_DROPPED: Any = object()


@dataclass(frozen=True)
class FilterPath:
    """A parsed `filter_path`: responses keep what `includes` name, less what `excludes` name;
    no filters at all keeps everything."""

    includes: tuple[Path, ...]
    excludes: tuple[Path, ...]


def parse_filter_path(expression: str) -> FilterPath:
    """Parse a comma-separated `filter_path` as OpenSearch does: blank entries are ignored (so an
    empty expression filters nothing), `-` starts an exclusion, `.` separates names (`\\.` is a
    dot inside one), a trailing `.` is ignored.
    Raises ValueError, with the cluster's own reason, for an exclusion of nothing (`-`)."""
    entries = {
        stripped for entry in expression.split(",") if (stripped := entry.strip(_JAVA_TRIMMED))
    }
    excluded = [entry[1:].strip(_JAVA_TRIMMED) for entry in entries if entry.startswith("-")]
    if excluded and not any(excluded):
        raise ValueError("filters cannot be null or empty")
    return FilterPath(
        includes=tuple(_parse_path(entry) for entry in entries if not entry.startswith("-")),
        excludes=tuple(_parse_path(entry) for entry in excluded if entry),
    )


def apply_filter_path(response: dict[str, Any], filter_path: FilterPath) -> dict[str, Any]:
    """`response` as OpenSearch writes it under `filter_path`.

    A name matches a pattern where `*` stands for any run of characters; a `*` or `**` pattern
    matches any name, and `**` also any number of further levels below it. Arrays are transparent:
    their elements are filtered as the array itself. Includes keep a matched value whole and drop
    scalars that only lie on the way to a match; excludes drop a matched value and keep all else.
    An object or array that filtering leaves empty is dropped, and the response itself is `{}`
    when nothing is left. Includes are applied first, then excludes, as the cluster does."""
    filtered = response
    if filter_path.includes:
        filtered = _filter_value(filtered, filter_path.includes, inclusive=True)
    if filter_path.excludes and filtered is not _DROPPED:
        filtered = _filter_value(filtered, filter_path.excludes, inclusive=False)
    return {} if filtered is _DROPPED else dict(filtered)


def _parse_path(entry: str) -> Path:
    # Java's String.split, which OpenSearch uses, drops trailing empty segments; `\` and the
    # character after it stand for a dot in OpenSearch's unescaping.
    segments = re.split(r"(?<!\\)\.", entry)
    while segments and not segments[-1]:
        segments.pop()
    return tuple(re.sub(r"\\.", ".", segment) for segment in segments)


def _filter_value(value: Any, paths: tuple[Path, ...], inclusive: bool) -> Any:
    """`value`, reached with `paths` still to match below it, filtered; else _DROPPED."""
    if isinstance(value, dict):
        kept = {}
        for name, child in value.items():
            matched, below = _match_name(name, paths)
            if matched or not below:
                # Includes keep a matched name whole, excludes drop it; a name that no path goes
                # through is the other way round.
                if matched is inclusive:
                    kept[name] = child
            elif (filtered := _filter_value(child, below, inclusive)) is not _DROPPED:
                kept[name] = filtered
        return kept or _DROPPED
    if isinstance(value, list):
        items = [
            f for item in value if (f := _filter_value(item, paths, inclusive)) is not _DROPPED
        ]
        return items or _DROPPED
    return _DROPPED if inclusive else value


def _match_name(name: str, paths: tuple[Path, ...]) -> tuple[bool, tuple[Path, ...]]:
    """Whether some path ends at property `name`; if none does, the paths that go on below it."""
    below: list[Path] = []
    for path in paths:
        if not path or not _pattern(path[0]).fullmatch(name):
            continue
        if len(path) == 1:
            return True, ()
        if path[0] == "**":
            below.append(path)
        below.append(path[1:])
    return False, tuple(below)


@functools.lru_cache(maxsize=1024)  # bounded: the segments are the callers' own
def _pattern(segment: str) -> re.Pattern[str]:
    """A filter segment as a regex: `*` is any run of characters; all else is literal."""
    return re.compile(".*".join(map(re.escape, segment.split("*"))), re.DOTALL)
