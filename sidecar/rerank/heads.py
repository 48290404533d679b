"""The relevance head a plain encoder (a bi-encoder, a base LM) gets to become a cross-encoder.

Two heads, both saved and loaded by sentence-transformers as any CrossEncoder's modules:

- `segment-cosine` (for training): the cosine between the mean of the query's token states and
  the mean of the document's, both from the one joint encoding of the pair, as a logit through a
  scale and a bias. On a bi-encoder's weights it ranks like the bi-encoder before any training
  (untrained, on Cranfield's validation queries at 100 candidates: nDCG@10 0.273, against 0.05
  for a fresh linear head and 0.394 for the bi-encoder's own cosine), so training from a few
  thousand judged pairs refines a ranker instead of growing one from a random projection, which
  those pairs leave at the label prior. It needs the tokenizer's segment ids (BERT-like).
- `mean-linear`: a fresh linear layer on the mean of all the pair's token states: any encoder,
  and the untrained stand-in's head (its scores are noise by design).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal, Self

import torch
from sentence_transformers.base.modules import Dense, Module, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling

Head = Literal["segment-cosine", "mean-linear"]
HEADS: tuple[Head, ...] = ("segment-cosine", "mean-linear")
# Pairs scored to calibrate a fresh segment-cosine head: enough for two parameters.
_CALIBRATION_PAIRS = 512


class SegmentCosine(Module):
    """scale * cos(mean of segment 0's token states, mean of segment 1's) + bias, as "scores".

    Segment 0 is the query with [CLS] and the first [SEP], segment 1 the document with the last
    [SEP] (the tokenizer's `token_type_ids`); padding is left out of both means.
    """

    def __init__(self, scale: float = 1.0, bias: float = 0.0) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))
        self.bias = torch.nn.Parameter(torch.tensor(float(bias)))

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        states = features["token_embeddings"]
        mask = features["attention_mask"].to(states.dtype)
        document = mask * features["token_type_ids"].to(states.dtype)
        query, document = (mask - document).unsqueeze(-1), document.unsqueeze(-1)
        query_mean = (states * query).sum(1) / query.sum(1).clamp(min=1.0)
        document_mean = (states * document).sum(1) / document.sum(1).clamp(min=1.0)
        cosine = torch.nn.functional.cosine_similarity(query_mean, document_mean, dim=-1)
        features["scores"] = (self.scale * cosine + self.bias).unsqueeze(-1)
        return features

    def save(
        self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any
    ) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        init_defaults: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Self:
        loaded: Self = cls.load_torch_weights(
            model_name_or_path,
            subfolder=subfolder,
            token=token,
            cache_folder=cache_folder,
            revision=revision,
            local_files_only=local_files_only,
            model=cls(),
        )
        return loaded


def cross_encoder_from_encoder(
    source: str,
    *,
    head: Head = "mean-linear",
    max_length: int | None = None,
    device: str = "cpu",
) -> Any:
    """A single-logit CrossEncoder on the plain encoder at `source` with a fresh `head`.

    Mean pooling rather than the [CLS] pooler of `*ForSequenceClassification`: a bi-encoder such
    as all-MiniLM-L6-v2 was trained through mean pooling, and a head on its [CLS] state learns
    several times slower. Raises ValueError as `check_head` does.
    """
    from sentence_transformers import CrossEncoder

    encoder = Transformer(source, max_seq_length=max_length)
    check_head(source, head, encoder.tokenizer)
    width = int(encoder.auto_model.config.hidden_size)
    top: list[Module]
    if head == "segment-cosine":
        top = [SegmentCosine()]
        # sentence-transformers reads a CrossEncoder's label count from the encoder's config
        # when no Dense layer names it.
        encoder.auto_model.config.num_labels = 1
    else:
        top = [
            Pooling(width, "mean"),
            Dense(width, 1, activation_function=None, module_output_name="scores"),
        ]
    return CrossEncoder(modules=[encoder, *top], device=device)


def check_head(source: str, head: Head, tokenizer: Any = None) -> None:
    """Refuses `head` for the plain encoder at `source` when it cannot take it: segment-cosine on
    a tokenizer without segment ids (RoBERTa-like), which cannot tell the query's tokens from the
    document's. Reads only the tokenizer's files, and only when `tokenizer` is not given, so a
    command can refuse before any other work. Raises ValueError."""
    if head != "segment-cosine":
        return
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    if "token_type_ids" not in tokenizer.model_input_names:
        raise ValueError(
            f"{source} has no segment ids: use the mean-linear head, which any encoder takes"
        )


def load_saved_cross_encoder(source: str, **kwargs: Any) -> Any:
    """The saved CrossEncoder at `source` (`CrossEncoder(source, **kwargs)`), this module's heads
    resolved to its own classes.

    sentence-transformers imports a module class outside the library only with
    `trust_remote_code`, which would also run whatever code a model folder or Hub repo brings.
    Its `_load_with_module_classes` maps the types named here to classes already imported and
    resolves every other type as usual, that gate included.
    """
    from sentence_transformers import CrossEncoder

    classes = {f"{SegmentCosine.__module__}.{SegmentCosine.__qualname__}": SegmentCosine}
    return CrossEncoder._load_with_module_classes(source, classes, **kwargs)


def calibrate_head(model: Any, pairs: Sequence[tuple[str, str, float]], seed: int) -> bool:
    """Set a fresh segment-cosine head's scale and bias from (a seeded sample of) `pairs`: the
    logits of the sample get a standard deviation of 1 around the log-odds of its mean label (the
    share of positives with 1/0 labels; Laplace-smoothed), so training starts from logits on the
    labels' scale rather than from cosines packed near 0.85 whose sigmoids are the same for every
    pair. The scale stays positive, the cosine's order kept: a fit of the labels would flip it,
    since the hard negatives are the first stage's best non-relevant candidates and come out
    closer to the query than the average relevant document (Cranfield's training pairs: mean
    cosine 0.866 against 0.843). Returns whether `model` has such a head (otherwise nothing is done).
    """
    import math

    head = model[-1]
    if not isinstance(head, SegmentCosine):
        return False
    sample = random.Random(seed).sample(list(pairs), min(len(pairs), _CALIBRATION_PAIRS))
    with torch.no_grad():
        head.scale.fill_(1.0)
        head.bias.fill_(0.0)
    cosines = model.predict(
        [(query, text) for query, text, _ in sample],
        activation_fn=torch.nn.Identity(),
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    spread = float(cosines.std())
    if not spread > 0:
        return True  # one pair, or all alike: the identity stays
    # Graded labels count by their weight, as the loss will.
    positive_weight = sum(label for _, _, label in sample)
    prior = (positive_weight + 1) / (len(sample) + 2)
    with torch.no_grad():
        head.scale.fill_(1.0 / spread)
        head.bias.fill_(math.log(prior / (1 - prior)) - float(cosines.mean()) / spread)
    return True
