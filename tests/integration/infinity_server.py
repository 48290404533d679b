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
  'sentence_transformers.base'"), so the tests serve `build_sequence_classifier`'s model.
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

import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sidecar.config import DEFAULT_EMBEDDING_MODEL, Settings
from sidecar.embedding import resolve_model_source
from sidecar.processes import stop
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
INSTALL_TIMEOUT_S = 1800.0
READY_TIMEOUT_S = 180.0
POLL_INTERVAL_S = 0.2
STOP_TIMEOUT_S = 15.0
LOG_TAIL_BYTES = 4000


class InfinityError(RuntimeError):
    """The Infinity virtualenv could not be made, or its server exited or never became ready."""


@dataclass(frozen=True)
class InfinityServer:
    # http://127.0.0.1:<port>; the Cohere-style endpoint is {url}/rerank.
    url: str
    # The name the server answers to (its GET /models id).
    model: str


def infinity_venv(environ: Mapping[str, str] = os.environ) -> Path:
    """<cache_dir>/venvs/infinity-<version>, made (or remade, when the pins or this Python
    changed) with the uv beside this interpreter, its progress printed. A stamp written last marks
    a finished install; a lock keeps two test sessions from installing at once.
    Raises InfinityError (no uv) and CalledProcessError (uv failed)."""
    venv = Settings.from_env(environ).cache_dir / "venvs" / f"infinity-{INFINITY_VERSION}"
    python = venv / "bin" / "python"
    stamp = venv / ".requirements"
    wanted = "\n".join([sys.version.split()[0], RESOLVED_AS_OF, *REQUIREMENTS]) + "\n"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with (venv.parent / f"{venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == wanted:
            return venv
        uv = Path(sys.executable).with_name("uv")
        if not uv.is_file():
            raise InfinityError(f"no uv beside {sys.executable}: `make install` puts it there")
        print(f"infinity tests: installing {' '.join(REQUIREMENTS)} into {venv}", flush=True)
        started = time.monotonic()
        for command in (
            [str(uv), "venv", "--clear", "--quiet", "--python", sys.executable, str(venv)],
            [
                str(uv),
                "pip",
                "install",
                "--python",
                str(python),
                "--exclude-newer",
                RESOLVED_AS_OF,
                *REQUIREMENTS,
            ],
        ):
            subprocess.run(command, env=dict(environ), check=True, timeout=INSTALL_TIMEOUT_S)
        stamp.write_text(wanted)
        print(f"infinity tests: installed in {time.monotonic() - started:.0f} s", flush=True)
    return venv


def build_sequence_classifier(target: Path, *, max_length: int, seed: int = 0) -> Path:
    """A cross-encoder that Infinity can serve, written to `target`: the bundled all-MiniLM-L6-v2
    encoder under BERT's [CLS] pooler and a seeded one-logit classifier
    (`BertForSequenceClassification`), its tokenizer declaring `max_length` tokens (where both
    Infinity and the in-process runtime cut pairs).

    The classifier's weights are drawn with a standard deviation of 1, not BERT's 0.02: with 0.02
    the logits of unrelated pairs span 0.05 and their sigmoids all round to about 0.5, too flat
    for a comparison to catch pairs mixed up; with 1 they span several units."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = resolve_model_source(DEFAULT_EMBEDDING_MODEL)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)
    torch.nn.init.normal_(model.classifier.weight, std=1.0)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source, model_max_length=max_length).save_pretrained(target)
    return target


@contextmanager
def running_infinity(
    model_dir: Path,
    *,
    max_client_batch_size: int = DEFAULT_MAX_CLIENT_BATCH_SIZE,
    environ: Mapping[str, str] = os.environ,
) -> Iterator[InfinityServer]:
    """`infinity_emb v2` serving the cross-encoder in `model_dir` on CPU in float32 (no
    torch.compile, no BetterTransformer, no warm-up: a quick start), refusing requests of more
    than `max_client_batch_size` documents. Yields once /health answers; stopped (SIGTERM, then
    SIGKILL) on exit. Raises InfinityError with the server's log tail when it exits or is not
    ready within READY_TIMEOUT_S."""
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
    # cwd: Infinity keeps a .infinity_cache folder in its working directory.
    with tempfile.TemporaryDirectory(prefix="infinity-") as workdir:
        log_path = Path(workdir) / "server.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                cwd=workdir,
                env=server_environ,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_until_ready(process, url, log_path)
            with urllib.request.urlopen(f"{url}/models", timeout=10.0) as answer:
                [served] = json.loads(answer.read())["data"]
            yield InfinityServer(url, served["id"])
        finally:
            stop(process, STOP_TIMEOUT_S)


def _wait_until_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    """Poll /health; fail at once if the process exits (a model it cannot load, port taken)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if (status := process.poll()) is not None:
            raise InfinityError(
                f"the Infinity server exited with {status}; log tail:\n{_tail(log)}"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1.0) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet: the model loads before the server binds
        if time.monotonic() >= deadline:
            raise InfinityError(
                f"the Infinity server at {url} was not ready within {READY_TIMEOUT_S:.0f} s; "
                f"log tail:\n{_tail(log)}"
            )
        time.sleep(POLL_INTERVAL_S)


def _tail(log: Path) -> str:
    with log.open("rb") as file:
        file.seek(max(0, log.stat().st_size - LOG_TAIL_BYTES))
        return file.read().decode(errors="replace")
