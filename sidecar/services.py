"""The long-lived pieces a running sidecar serves requests with, built once by `create_app`."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from sidecar.api.proxy import ForwardPolicy
from sidecar.config import Settings
from sidecar.pipeline import SearchPipeline
from sidecar.rerank.reranker import PairScorer
from sidecar.retrieval.identity import UpstreamIdentity
from sidecar.retrieval.opensearch import Upstream
from sidecar.write_path import WritePath


@dataclass
class Services:
    settings: Settings
    pipeline: SearchPipeline
    writes: WritePath
    # The sidecar's calls to the cluster (searches, mapping reads), over `upstream.transport`:
    # the one connection to the cluster that the pass-through and the write path share.
    upstream: Upstream
    # Whose identity each upstream call carries.
    identity: UpstreamIdentity
    # Body limits, timeouts and forwarding headers of the pass-through.
    forward_policy: ForwardPolicy
    # What scores the reranker's pairs: readiness requires the micro-batcher's loop to be alive
    # (a remote tier is always "running": searches answer unreranked while it is down).
    batcher: PairScorer

    @property
    def models_loaded(self) -> bool:
        return self.batcher.running


SERVICES = web.AppKey("services", Services)
