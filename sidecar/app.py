"""Wiring: `create_app(settings)` builds the aiohttp application; every long-lived resource (models,
executors, batcher, upstream clients) is set up and torn down in one cleanup context."""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar import __version__
from sidecar.api import proxy
from sidecar.api.routes import add_routes, edge
from sidecar.config import (
    RERANK_RUNTIMES,
    RemoteReranker,
    RerankRuntime,
    Settings,
    SettingsError,
    mask_credentials,
)
from sidecar.embedding import BiEncoder, EncoderPool
from sidecar.metrics import Metrics
from sidecar.pipeline import SearchPipeline
from sidecar.rerank.backend import (
    CrossEncoderBackend,
    PairPreparer,
    RerankBackend,
    hub_model_available,
)
from sidecar.rerank.batcher import BatchLimits, MicroBatcher
from sidecar.rerank.cache import ScoreCache
from sidecar.rerank.final_scorer import LearnedScorer, ServingFileError, read_serving
from sidecar.rerank.remote.tier import HttpTier, remote_stage_two
from sidecar.rerank.reranker import PairScorer, Reranker
from sidecar.rerank.runtimes import calibration_pairs
from sidecar.retrieval.discovery import ProfileResolver
from sidecar.retrieval.identity import UpstreamIdentity
from sidecar.retrieval.opensearch import Upstream
from sidecar.retrieval.profiles import ProfileError
from sidecar.retrieval.sigv4 import SigV4Signer, keep_fresh
from sidecar.retrieval.tls import TlsError, client_context
from sidecar.retrieval.transport import Transport
from sidecar.services import SERVICES, Services
from sidecar.write_path import WritePath

if TYPE_CHECKING:  # the shared score cache needs the optional `redis` package
    from sidecar.rerank.shared_cache import SharedScoreCache

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    backend: RerankBackend | None = None,
    encoder: BiEncoder | None = None,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """The sidecar application. `backend` and `encoder` replace the configured models (tests,
    benchmarks); otherwise both are loaded, and the cross-encoder warmed up, before serving.
    Bi-encoders that index profiles name are loaded too, and every profile configured for an
    existing index is checked against its mapping (SettingsError when they disagree)."""
    served = model_serving(settings)
    settings, final_scorer = served.settings, served.final_scorer
    app = web.Application(middlewares=[edge], client_max_size=settings.max_body_bytes)
    metrics_registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(metrics_registry)

    async def services(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        # Before anything is started: either may refuse the settings.
        identity = upstream_identity(settings)
        tls = upstream_tls(settings)
        shared_cache = shared_score_cache(settings, metrics)
        # One thread each: the model thread runs batches back to back; tokenizing and query
        # embedding never queue behind a model call.
        model_executor = ThreadPoolExecutor(1, thread_name_prefix="rerank-model")
        prepare_executor = ThreadPoolExecutor(1, thread_name_prefix="rerank-prepare")
        embed_executor = ThreadPoolExecutor(1, thread_name_prefix="embed")
        query_encoder: BiEncoder = (
            encoder
            if encoder is not None
            else await loop.run_in_executor(embed_executor, BiEncoder.from_settings, settings)
        )
        profile_models = sorted(
            {
                p.vector.model
                for p in settings.profiles.values()
                if p.vector.model and p.vector.model != query_encoder.model_name
            }
        )
        encoders = EncoderPool(
            query_encoder,
            [
                await loop.run_in_executor(embed_executor, _load_encoder, settings, name)
                for name in profile_models
            ],
        )
        reranker_backend: PairPreparer
        batcher: PairScorer
        remote_tier: HttpTier | None = None
        if backend is None and settings.reranker_backend not in RERANK_RUNTIMES:
            kind = cast(RemoteReranker, settings.reranker_backend)
            reranker_backend, batcher, remote_tier = remote_stage_two(settings, kind, metrics)
        else:
            in_process: RerankBackend = (
                backend
                if backend is not None
                else await loop.run_in_executor(model_executor, load_cross_encoder, settings)
            )
            reranker_backend = in_process
            limits = BatchLimits(
                max_batch_pairs=settings.rerank_max_batch_pairs,
                max_batch_tokens=settings.rerank_max_batch_tokens,
                max_wait_s=settings.rerank_max_wait_s,
                max_pending_pairs=settings.rerank_max_pending_pairs,
                merge_requests=settings.rerank_cross_request_batching,
            )
            micro_batcher = MicroBatcher(
                in_process.score, limits, model_executor, metrics.observe_batch
            )
            await micro_batcher.start()
            batcher = micro_batcher
        transport = Transport(
            settings.opensearch_urls,
            settings.upstream_timeout_s,
            metrics,
            ssl_context=tls,
            signer=identity.signer,
            probe_headers=identity.own(),
        )
        upstream = Upstream(transport, metrics, identity)
        refresher = (
            asyncio.create_task(keep_fresh(identity.signer))
            if isinstance(identity.signer, SigV4Signer)
            else None
        )
        try:
            profiles = ProfileResolver(
                settings.profiles,
                upstream,
                local_model=query_encoder.model_name,
                local_dimensions=encoders.dimensions,
                allow_lexical_only=settings.allow_lexical_only,
                mapping_ttl_s=settings.mapping_cache_ttl_s,
            )
            try:
                await profiles.check_configured()
            except ProfileError as error:
                raise SettingsError(f"index profile: {error}") from None
            cache = ScoreCache(settings.rerank_cache_entries, settings.rerank_cache_ttl_s)
            reranker = Reranker(
                reranker_backend,
                batcher,
                cache,
                prepare_executor,
                metrics,
                overlap_tokens=settings.chunk_overlap_tokens,
                passage_tokens=settings.passage_tokens,
                shared_cache=shared_cache,
            )
            app[SERVICES] = Services(
                settings=settings,
                pipeline=SearchPipeline(
                    settings,
                    encoders,
                    profiles,
                    upstream,
                    reranker,
                    embed_executor,
                    metrics,
                    final_scorer,
                    caller_cache_key(settings),
                ),
                writes=WritePath(profiles, encoders, embed_executor, metrics),
                upstream=upstream,
                identity=identity,
                forward_policy=proxy.ForwardPolicy(
                    max_body_bytes=settings.max_body_bytes,
                    body_timeout_s=settings.client_body_timeout_s,
                    idle_timeout_s=settings.pass_through_idle_timeout_s,
                    trust_forwarded=settings.trust_forwarded_headers,
                ),
                batcher=batcher,
            )
            metrics.build_info.labels(
                version=__version__,
                reranker=reranker_backend.identity,
                device=reranker_backend.device,
                dtype=reranker_backend.dtype,
                embedding_model=query_encoder.model_name,
            ).set(1)
            metrics.reranker_serving.labels(
                final_scorer="blend" if final_scorer is None else "learned",
                rerank_depth=str(settings.rerank_depth or "all"),
                validation=served.validation,
            ).set(1)
            pipeline = app[SERVICES].pipeline
            metrics.track_gauges(
                lambda: batcher.pending_pairs,
                gpu_memory_reader(reranker_backend.device),
                {
                    "scores": lambda: len(cache),
                    "query_vectors": lambda: pipeline.cached_query_vectors,
                    "mappings": lambda: profiles.cached_mappings,
                },
            )
            log.info(
                "models ready",
                extra={
                    "reranker": reranker_backend.identity,
                    "reranker_device": reranker_backend.device,
                    "reranker_dtype": reranker_backend.dtype,
                    "embedding_model": query_encoder.model_name,
                },
            )
            yield
        finally:
            if refresher is not None:
                refresher.cancel()
            if isinstance(batcher, MicroBatcher):
                await batcher.stop()
            if remote_tier is not None:
                await remote_tier.close()
            if shared_cache is not None:
                await shared_cache.close()
            await transport.close()
            for executor in (model_executor, prepare_executor, embed_executor):
                executor.shutdown(wait=False, cancel_futures=True)

    app.cleanup_ctx.append(services)
    add_routes(app, metrics_registry, settings.metrics_port)
    return app


def gpu_memory_reader(device: str) -> Callable[[], float] | None:
    """Reads torch's allocated CUDA memory at scrape time; None on CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    return lambda: float(torch.cuda.memory_allocated(device))


def upstream_identity(settings: Settings) -> UpstreamIdentity:
    """Raises SettingsError when the identity settings cannot work together."""
    try:
        signer = None
        if settings.service_aws_region is not None:
            signer = SigV4Signer(settings.service_aws_region, settings.service_aws_service)
        return UpstreamIdentity.build(
            settings.upstream_identity,
            settings.forward_headers,
            settings.service_username,
            settings.service_password_value(),
            signer,
        )
    except ValueError as error:
        raise SettingsError(f"upstream identity: {error}") from None


def caller_cache_key(settings: Settings) -> bytes | None:
    """The key each caller's score-cache partition is an HMAC under, when callers are kept apart."""
    if not settings.caches_per_caller:
        return None
    if settings.score_cache_caller_key is not None:
        return settings.score_cache_caller_key.get_secret_value().encode()
    return secrets.token_bytes(32)


def shared_score_cache(settings: Settings, metrics: Metrics) -> SharedScoreCache | None:
    """The Redis score cache replicas share, when SIDECAR_SCORE_CACHE_URL names one (it connects on
    first use). Raises SettingsError when the `redis` package is missing or the URL is unusable."""
    if settings.score_cache_url is None:
        return None
    try:
        from sidecar.rerank.shared_cache import SharedScoreCache
    except ModuleNotFoundError as error:
        if error.name is None or error.name.partition(".")[0] != "redis":
            raise
        raise SettingsError(
            "SIDECAR_SCORE_CACHE_URL needs the redis package: "
            "pip install 'opensearch-rerank-sidecar[redis]'"
        ) from None
    url = settings.score_cache_url.get_secret_value()
    try:
        return SharedScoreCache(
            url,
            ttl_s=settings.rerank_cache_ttl_s,
            timeout_s=settings.score_cache_timeout_s,
            metrics=metrics,
        )
    except ValueError:
        # Not the parser's message: it may quote the part of the URL that holds the password.
        raise SettingsError(
            f"SIDECAR_SCORE_CACHE_URL={mask_credentials(url)!r} is not a valid Redis URL"
        ) from None


def upstream_tls(settings: Settings) -> ssl.SSLContext | None:
    """Raises SettingsError when a TLS file cannot be used."""
    try:
        return client_context(
            settings.opensearch_urls[0],
            ca_certs=settings.upstream_ca_certs,
            client_cert=settings.upstream_client_cert,
            client_key=settings.upstream_client_key,
            verify=settings.upstream_verify_certs,
        )
    except TlsError as error:
        raise SettingsError(str(error)) from None


def _load_encoder(settings: Settings, model: str) -> BiEncoder:
    return BiEncoder(
        model,
        device=settings.device,
        dtype=settings.embedding_dtype,
        batch_size=settings.embedding_batch_size,
    )


# What a model's serving.json says of its validation queries (`unrecorded`: no file, or an older
# one), by its `gained`.
Validation = Literal["gained", "no_gain", "unrecorded"]
_VALIDATION: dict[bool | None, Validation] = {True: "gained", False: "no_gain", None: "unrecorded"}


@dataclass(frozen=True)
class ModelServing:
    """How the configured reranker is served, after its serving.json."""

    settings: Settings  # with the model's recorded rerank depth where the operator set none
    final_scorer: LearnedScorer | None  # None: the blend
    validation: Validation


def model_serving(settings: Settings) -> ModelServing:
    """The settings with the reranker's recorded serving choices applied where the operator made
    none (its rerank depth and blend weight; without a record the weight is 1.0), and its
    learned final scorer unless `final_scorer` is `blend`.

    Only a local model folder can carry serving.json. Raises SettingsError for one this sidecar
    cannot read (another version, a scorer over other features).
    """
    folder = Path(settings.reranker_model)
    try:
        serving = read_serving(folder) if folder.is_dir() else None
    except ServingFileError as error:
        raise SettingsError(f"reranker: {error}") from None
    if serving is None:
        return ModelServing(settings, None, "unrecorded")
    if settings.rerank_depth is None and serving.rerank_depth is not None:
        settings = replace(settings, rerank_depth=serving.rerank_depth)
    settings = replace(settings, alpha=settings.blend_alpha(serving.alpha))
    scorer = serving.final_scorer if settings.final_scorer == "auto" else None
    if serving.gained is False:
        log.warning(
            "the reranker showed no gain over the first stage on its validation queries (no "
            "depth's 95% CI above 0, serving.json, which records the shallowest validated depth "
            "for it): measure it on "
            "your own queries with `sidecar eval` before relying on it",
            extra={"reranker_model": settings.reranker_model},
        )
    log.info(
        "reranker serving choices",
        extra={
            "rerank_depth": settings.rerank_depth,
            "final_scorer": "learned"
            if scorer is not None
            else f"blend alpha {settings.blend_alpha():g}",
        },
    )
    return ModelServing(settings, scorer, _VALIDATION[serving.gained])


def load_cross_encoder(settings: Settings) -> CrossEncoderBackend:
    """The configured cross-encoder, warmed up by one forward pass.

    Raises SettingsError at once when the model is neither local nor reachable on the Hub."""
    if not hub_model_available(settings.reranker_model):
        raise SettingsError(
            f"SIDECAR_RERANKER_MODEL={settings.reranker_model!r} is not a local directory, not in the "
            "Hugging Face cache, and the Hub is unreachable: point it at a local model directory"
        )
    try:
        backend = CrossEncoderBackend(
            settings.reranker_model,
            device=settings.device,
            dtype=settings.reranker_dtype,
            max_length=settings.reranker_max_length,
            runtime=cast(RerankRuntime, settings.reranker_backend),
            quantization=settings.reranker_quantization,
            calibration=(
                calibration_pairs(settings.reranker_calibration)
                if settings.reranker_calibration is not None
                and settings.reranker_quantization == "static"
                else ()
            ),
            cache_dir=settings.cache_dir,
        )
    except (ValueError, OSError) as error:
        raise SettingsError(f"reranker: {error}") from None
    backend.warm_up()
    return backend
