"""A real Infinity server (the `infinity-emb` package) for the remote-reranker tests: Cohere-style
`POST /rerank` on a free 127.0.0.1 port, offline, from a virtualenv of its own that uv makes on
first use under the sidecar's cache folder (infinity-emb needs sentence-transformers < 4 and
numpy < 2; the sidecar runs sentence-transformers 6 and numpy 2).

What infinity-emb 0.0.78 (the newest on PyPI; with sentence-transformers 3.4.1, transformers
4.57.6) does, read from its source and checked by test_infinity_server.py:

- Models: it picks its engine from the model folder's config.json alone. Only a
  `*ForSequenceClassification` architecture with one label is served for `/rerank`. The
  cross-encoders the sidecar saves (an encoder, mean pooling and a Dense head: `BertModel` in
  config.json) are taken for embedders, and the server exits at start ("No module named
  'sentence_transformers.base'"), so the tests serve conftest's `sequence_classifier`.
- Scores: `relevance_score` is sigmoid(logit), computed in float32; `"raw_scores": true` (an
  Infinity field, not Cohere's) returns the logit. Results come sorted by score, best first, each
  with its `index` in `documents`; `top_n` keeps the best n; `return_documents` adds the text.
- Truncation: each pair is cut to the tokenizer's `model_max_length` (from the folder's
  tokenizer_config.json), longest text first. No flag or request field changes it, so the
  served folder must declare the length the sidecar cuts at.
- Limits: 1 to INFINITY_MAX_CLIENT_BATCH_SIZE documents a request (default 2048), else 422
  before any inference; a text may have 122,880 characters at most, and leading and trailing
  whitespace is stripped; `--batch-size` (default 32) pairs per forward pass, cut by the server
  from its queue; more than INFINITY_QUEUE_SIZE (default 32,000) queued pairs answer 429.
- Name: it answers as the last two parts of the model path ("models/reranker" for
  /tmp/.../models/reranker), shown by GET /models; with one model served, any `model` in a
  request is accepted.
- Readiness: /health answers only once the model has loaded (uvicorn binds after the startup
  that loads it), about 13 s on two cores.
- Offline: HF_HUB_OFFLINE=1 and a local folder; DO_NOT_TRACK=1 turns off its telemetry.

The virtualenv (82 packages, 5.8 GB) is hard links into uv's cache but for 3 MB: torch and its
CUDA libraries are the sidecar's own (PyPI's Linux torch is the CUDA build; the CPU-only index is
not reachable here), so `make install` has already put them there. The 20 packages the sidecar
lacks are 153 MB of wheels, fetched and installed in 3 s here; a warm install takes 1 to 7 s.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.integration.model_servers import ModelServer
from tests.integration.processes import free_port

INFINITY_VERSION = "0.0.78"
REQUIREMENTS = (
    f"infinity-emb[server,torch]=={INFINITY_VERSION}",
    "torch==2.15.0",  # the sidecar's today: linked from uv's cache, not downloaded again
    "sentence-transformers==3.4.1",
    "transformers==4.57.6",
    "numpy==1.26.4",
)
# Everything else (FastAPI, uvicorn, pydantic...) as PyPI had it then: infinity-emb bounds most of
# them from below only.
RESOLVED_AS_OF = "2026-12-08T00:00:00Z"
DEFAULT_MAX_CLIENT_BATCH_SIZE = 2048


class InfinityError(RuntimeError):
    """The Infinity virtualenv could not be made, or its server exited or never became ready."""


INFINITY = ModelServer("Infinity", f"infinity-{INFINITY_VERSION}", InfinityError)


@dataclass(frozen=True)
class InfinityServer:
    # http://127.0.0.1:<port>; the Cohere-style endpoint is {url}/rerank.
    url: str
    # The name the server answers to (its GET /models id).
    model: str


def infinity_venv(environ: Mapping[str, str] = os.environ) -> Path:
    """<cache_dir>/venvs/infinity-<version> with REQUIREMENTS as of RESOLVED_AS_OF, made on first
    use (ModelServer.venv). Raises InfinityError (no uv) and CalledProcessError (uv failed)."""
    return INFINITY.venv(REQUIREMENTS, exclude_newer=RESOLVED_AS_OF, environ=environ)


@contextmanager
def running_infinity(
    model_dir: Path,
    *,
    max_client_batch_size: int = DEFAULT_MAX_CLIENT_BATCH_SIZE,
    environ: Mapping[str, str] = os.environ,
) -> Iterator[InfinityServer]:
    """`infinity_emb v2` serving the cross-encoder in `model_dir` on CPU in float32 (no
    torch.compile, no BetterTransformer, no warm-up: a quick start), refusing requests of more
    than `max_client_batch_size` documents. Yields once /health answers; stopped on exit. Raises
    InfinityError with the server's log tail when it exits or is not ready in time
    (ModelServer.running)."""
    venv = infinity_venv(environ)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(venv / "bin" / "infinity_emb"),
        "v2",
        f"--model-id={model_dir}",
        "--host=127.0.0.1",
        f"--port={port}",
        "--engine=torch",
        "--device=cpu",
        "--dtype=float32",
        "--no-compile",
        "--no-bettertransformer",
        "--no-model-warmup",
        "--log-level=warning",
    ]
    server_environ = {
        **environ,
        "HF_HUB_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "INFINITY_MAX_CLIENT_BATCH_SIZE": str(max_client_batch_size),
    }
    # Its working directory is a temporary folder: Infinity keeps a .infinity_cache folder there.
    with INFINITY.running(command, url=url, ready_path="/health", environ=server_environ):
        with urllib.request.urlopen(f"{url}/models", timeout=10.0) as answer:
            [served] = json.loads(answer.read())["data"]
        yield InfinityServer(url, served["id"])
