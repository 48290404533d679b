"""Where the cross-encoder's forward pass runs: torch as loaded, or one ONNX export of the same
model run by ONNX Runtime or OpenVINO, either optionally quantized to int8.

The export is ours (`torch.onnx.export` of the whole module stack, relevance head included)
rather than sentence-transformers' `backend=` because that path needs `optimum-onnx`, which pins
transformers below the 5.x this project runs on. Both runtimes read the same `.onnx` file, so a
model is exported once per identity and options into a cache folder and reused by every start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from sidecar.config import Quantization, RerankRuntime
from sidecar.device import read_cpu_flags

log = logging.getLogger(__name__)

# Bump when the export or quantization recipe changes: cached files of an older recipe are
# then never read.
EXPORT_RECIPE = 1
# ONNX opset of the export: one every ONNX Runtime and OpenVINO release of the last years reads.
_OPSET = 17
# Calibration batches for static quantization (pairs per batch).
_CALIBRATION_BATCH = 8

Features = Mapping[str, NDArray[np.int64]]


class PairScorer(Protocol):
    """One forward pass over tokenized pairs: a logit per row."""

    def __call__(self, features: Features) -> NDArray[np.float32]: ...


def available_runtimes() -> list[RerankRuntime]:
    """The runtimes whose packages are installed (torch always is)."""
    import importlib.util

    found: list[RerankRuntime] = ["torch"]
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        found.append("onnx")
        if importlib.util.find_spec("openvino"):
            found.append("openvino")
    return found


def select_runtime(
    requested: RerankRuntime,
    device: str,
    quantization: Quantization,
    cpu_flags: frozenset[str] | None = None,
) -> str:
    """`auto`, by `sidecar bench --model-bench grid` (README "Stage 2 speed"): torch on CUDA and
    on CPUs with AMX tiles (its fp16 / bf16 paths); on other CPUs OpenVINO when installed (fp32
    1.2x torch's pairs/s, same scores), else torch; for int8, ONNX Runtime for `dynamic` (the
    one int8 on the front) and OpenVINO, else ONNX Runtime, for `static`.

    Raises ValueError when the runtime's packages are not installed, when an export is asked to
    run on CUDA (exports run on CPU), or int8 on torch."""
    installed = available_runtimes()
    runtime = requested
    if requested == "auto":
        flags = read_cpu_flags() if cpu_flags is None else cpu_flags
        if quantization == "dynamic":
            runtime = "onnx"
        elif quantization == "static":
            runtime = "openvino" if "openvino" in installed else "onnx"
        elif device.startswith("cuda") or "amx_bf16" in flags or "openvino" not in installed:
            runtime = "torch"
        else:
            runtime = "openvino"
    if runtime not in installed:
        extra = "onnx" if runtime == "onnx" else "openvino"
        raise ValueError(
            f"SIDECAR_RERANKER_BACKEND={runtime} needs the `{extra}` extra "
            f"(pip install 'opensearch-rerank-sidecar[{extra}]')"
        )
    if runtime != "torch" and device.startswith("cuda"):
        raise ValueError(f"SIDECAR_RERANKER_BACKEND={runtime} runs on CPU; use torch on {device}")
    if quantization != "none" and runtime == "torch":
        raise ValueError(
            "int8 quantization (SIDECAR_RERANKER_QUANTIZATION) needs the onnx or openvino backend"
        )
    return runtime


def export_key(
    identity: str, quantization: Quantization, calibration: Sequence[tuple[str, str]]
) -> str:
    """What names a cached export: the model's identity (which covers a local model's files),
    the recipe, the quantization and, for static quantization, the calibration pairs."""
    digest = hashlib.blake2b(digest_size=10)
    digest.update(json.dumps([identity, EXPORT_RECIPE, _OPSET, quantization]).encode())
    if quantization == "static":
        for query, text in calibration:
            digest.update(f"{len(query)}:{query}{len(text)}:{text}".encode())
    return digest.hexdigest()


def cached_export(
    model: Any,
    identity: str,
    quantization: Quantization,
    cache_dir: Path,
    calibration: Sequence[tuple[str, str]] = (),
) -> Path:
    """The `.onnx` file for `model` (a sentence-transformers CrossEncoder) under `cache_dir`,
    exported, graph-optimized and quantized on first use, reused afterwards.

    Written into a temporary folder and renamed into place, so a replica killed mid-export or
    two replicas exporting at once never leave a half-written file to the next start. Raises
    ValueError when static quantization gets no calibration pairs."""
    if quantization == "static" and not calibration:
        raise ValueError(
            "static int8 quantization needs calibration pairs (SIDECAR_RERANKER_CALIBRATION)"
        )
    folder = cache_dir / "rerankers" / export_key(identity, quantization, calibration)
    target = folder / "model.onnx"
    if target.exists():
        log.info("reranker export reused: %s", target)
        return target
    cache_dir.joinpath("rerankers").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=cache_dir / "rerankers"))
    try:
        # int8 is quantized from the plain export: the quantizers cannot type the fused
        # operators of the optimized graph and would skip most matrix multiplications.
        fp32 = _export(model, work / "fp32.onnx")
        if quantization == "dynamic":
            final = _quantize_dynamic(fp32, work / "int8.onnx")
        elif quantization == "static":
            final = _quantize_static(fp32, work / "int8.onnx", model, calibration)
        else:
            final = _optimize(fp32, work / "optimized.onnx", model)
        staged = work / "staged"
        staged.mkdir()
        final.rename(staged / "model.onnx")
        (staged / "export.json").write_text(
            json.dumps(
                {"identity": identity, "recipe": EXPORT_RECIPE, "quantization": quantization}
            )
            + "\n"
        )
        try:
            staged.rename(folder)
        except OSError:
            if not target.exists():  # not another replica's finished export: a real failure
                raise
        log.info("reranker exported: %s (%s)", target, quantization)
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def calibration_pairs(dataset: Path, count: int = 256, seed: int = 0) -> list[tuple[str, str]]:
    """`count` (query, document) pairs from a BEIR folder for static quantization: its first
    queries, each with a document drawn by a seeded shuffle of the corpus, read as the rerank
    stage reads documents. Raises OSError or CorpusError when the folder cannot be read."""
    import itertools
    import random

    from sidecar.bench import read_queries
    from sidecar.indexing.corpus import read_corpus

    queries = read_queries(dataset / "queries.jsonl", count)
    documents = [
        document.embedding_text
        for document in itertools.islice(read_corpus(dataset / "corpus.jsonl"), count * 8)
    ]
    random.Random(seed).shuffle(documents)
    return [
        (query, documents[i % len(documents)])
        for i, query in enumerate(itertools.islice(itertools.cycle(queries), count))
    ]


class OnnxRuntimeScorer:
    """An exported cross-encoder on ONNX Runtime's CPU provider, one thread per core."""

    def __init__(self, path: Path) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        self._session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self._inputs = [item.name for item in self._session.get_inputs()]

    def __call__(self, features: Features) -> NDArray[np.float32]:
        (logits,) = self._session.run(None, {name: features[name] for name in self._inputs})
        return np.asarray(logits, dtype=np.float32).reshape(-1)


class OpenVinoScorer:
    """An exported cross-encoder compiled by OpenVINO for the CPU. `bf16` asks OpenVINO to
    compute in bf16 where the CPU has native units (it falls back to fp32 elsewhere)."""

    def __init__(self, path: Path, *, bf16: bool, cache_dir: Path) -> None:
        import openvino

        core = openvino.Core()
        config = {
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            # OpenVINO's own compiled-model cache: a later start skips most of compilation.
            "CACHE_DIR": str(cache_dir / "rerankers" / "openvino-cache"),
        }
        self._compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self._inputs = [item.get_any_name() for item in self._compiled.inputs]

    def __call__(self, features: Features) -> NDArray[np.float32]:
        result = self._compiled({name: features[name] for name in self._inputs})
        return np.asarray(result[0], dtype=np.float32).reshape(-1)


def _input_names(tokenizer: Any) -> list[str]:
    return [
        name
        for name in ("input_ids", "attention_mask", "token_type_ids")
        if name in tokenizer.model_input_names
    ]


def _export(model: Any, target: Path) -> Path:
    """The whole CrossEncoder (encoder, pooling, head) as one graph from token ids to logits,
    with batch and sequence length dynamic."""
    import torch

    names = _input_names(model.tokenizer)
    sample = model.tokenizer(
        ["a query"], ["a document to export the model with"], return_tensors="pt"
    )

    class Logits(torch.nn.Module):
        def __init__(self, cross_encoder: Any) -> None:
            super().__init__()
            self.cross_encoder = cross_encoder

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            output = self.cross_encoder(dict(zip(names, tensors, strict=True)))
            scores: torch.Tensor = output["scores"]
            return scores.reshape(-1)

    axes = {name: {0: "pairs", 1: "tokens"} for name in names} | {"logits": {0: "pairs"}}
    module = Logits(model).to("cpu").eval()
    # The TorchScript exporter: torch deprecates it for the torch.export one, which needs the
    # onnxscript package and does not yet trace every encoder's masking code. Its tracer
    # warnings are about Python branches on shapes, fixed for the traced graph as intended, and
    # the mask indexing it warns about never uses negative indices (fp32 exports score as torch
    # does: tests/integration/test_runtimes.py).
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit._trace.TracerWarning)
        warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
        torch.onnx.export(
            module,
            tuple(sample[name] for name in names),
            str(target),
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=_OPSET,
            dynamo=False,
        )
    return target


def _optimize(source: Path, target: Path, model: Any) -> Path:
    """ONNX Runtime's transformer graph fusions (attention, layer norm, GELU) for BERT-like
    encoders; other architectures are left as exported."""
    from onnxruntime.transformers.optimizer import optimize_model

    config = model[0].auto_model.config
    if config.model_type not in {"bert", "distilbert", "roberta", "xlm-roberta", "electra"}:
        return source
    optimized = optimize_model(
        str(source),
        model_type="bert",
        num_heads=int(config.num_attention_heads),
        hidden_size=int(config.hidden_size),
    )
    optimized.save_model_to_file(str(target))
    return target


def _quantize_dynamic(source: Path, target: Path) -> Path:
    """Weights to int8 ahead of time, activations per batch at run time: no calibration."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    return target


def _quantize_static(
    source: Path, target: Path, model: Any, calibration: Sequence[tuple[str, str]]
) -> Path:
    """Weights and activations to int8 (QDQ), activation ranges measured on `calibration`
    pairs, matrix multiplications only (quantizing normalization and softmax costs ranking
    quality for little speed)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    names = _input_names(model.tokenizer)
    max_length = int(model.max_seq_length or 512)

    class Pairs(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches: Iterator[dict[str, Any]] = iter(())
            self.rewind()

        def get_next(self) -> dict[str, Any] | None:
            return next(self._batches, None)

        def rewind(self) -> None:
            self._batches = (
                _features(
                    model.tokenizer,
                    calibration[start : start + _CALIBRATION_BATCH],
                    names,
                    max_length,
                )
                for start in range(0, len(calibration), _CALIBRATION_BATCH)
            )

    quantize_static(
        str(source),
        str(target),
        Pairs(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
    )
    return target


def _features(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], names: Sequence[str], max_length: int
) -> dict[str, NDArray[np.int64]]:
    encoded = tokenizer(
        [query for query, _ in pairs],
        [text for _, text in pairs],
        padding=True,
        truncation="longest_first",
        max_length=max_length,
        return_tensors="np",
    )
    return {name: np.asarray(encoded[name], dtype=np.int64) for name in names}


def tokenize_pairs(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int
) -> dict[str, NDArray[np.int64]]:
    """Pairs as the exported graph takes them, tokenized as CrossEncoder.predict does (padded to
    the longest, `longest_first` truncation)."""
    return _features(tokenizer, pairs, _input_names(tokenizer), max_length)
