"""A KServe custom predictor that serves a saved sentence-transformers cross-encoder over the v2
inference protocol: the remote tier's side of stage 2. Runs in the `kserve` virtualenv that
tests/integration/kserve_server.py makes, never in the sidecar's.

`POST /v2/models/{name}/infer` takes two BYTES inputs of shape [N], `query` and `document` (pair i
is query[i] with document[i]), and answers one FP32 output `score` of shape [N]: pair i's raw
relevance logit (no sigmoid), in input order. A pair longer than `--max_length` tokens (default:
the model's own) is cut as the model's `predict` cuts it: the longer text loses its tail first.

    python kserve_model.py --model_dir=DIR --model_name=reranker --http_port=8080 --enable_grpc=false
"""

from __future__ import annotations

import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
from kserve.errors import InvalidInput
from kserve.utils.utils import generate_uuid
from sentence_transformers import CrossEncoder

INPUTS = ("query", "document")
OUTPUT = "score"


class CrossEncoderModel(Model):
    """The cross-encoder in `model_dir`, loaded at construction (the server listens only once it is
    ready). Scoring runs on one thread of its own, off the server's event loop, so health checks
    answer during a long batch and the model's tokenizer, whose truncation settings are state, is
    used by one thread only."""

    def __init__(self, name: str, model_dir: str, max_length: int | None, batch_size: int) -> None:
        super().__init__(name)
        self.model_dir = model_dir
        self.max_length = max_length
        self.batch_size = batch_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cross-encoder")
        self.load()

    def load(self) -> bool:
        self._model = CrossEncoder(self.model_dir, max_length=self.max_length)
        if self._model.num_labels != 1:
            raise ValueError(f"{self.model_dir} has {self._model.num_labels} labels, not 1")
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": name, "datatype": "BYTES", "shape": [-1]} for name in INPUTS]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [{"name": OUTPUT, "datatype": "FP32", "shape": [-1]}]

    async def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        """Raises InvalidInput (HTTP 400) for a request that is not two BYTES vectors of one length."""
        if not isinstance(payload, InferRequest):
            raise InvalidInput("this model speaks the v2 protocol: POST /v2/models/{name}/infer")
        queries, documents = (_texts(payload, name) for name in INPUTS)
        if len(queries) != len(documents):
            raise InvalidInput(f"{len(queries)} queries but {len(documents)} documents")
        scores = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._score, queries, documents
        )
        output = InferOutput(name=OUTPUT, shape=[len(scores)], datatype="FP32", data=scores)
        return InferResponse(
            response_id=payload.id or generate_uuid(), model_name=self.name, infer_outputs=[output]
        )

    def _score(self, queries: list[str], documents: list[str]) -> np.ndarray:
        logits = self._model.predict(
            list(zip(queries, documents, strict=True)),
            batch_size=self.batch_size,
            activation_fn=torch.nn.Identity(),
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(logits, dtype=np.float32)


def _texts(request: InferRequest, name: str) -> list[str]:
    """The input `name` as strings: JSON data arrives as str, the binary extension's as bytes."""
    tensor = request.get_input_by_name(name)
    if tensor is None or tensor.datatype != "BYTES" or len(tensor.shape) != 1:
        raise InvalidInput(f"expected a BYTES input {name!r} of shape [N]")
    try:
        values = tensor.as_numpy()
    except ValueError:
        raise InvalidInput(
            f"input {name!r} does not hold the {tensor.shape} items its shape says"
        ) from None
    return [item.decode() if isinstance(item, bytes) else str(item) for item in values]


def main() -> None:
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_dir", required=True, help="a saved CrossEncoder's folder")
    parser.add_argument(
        "--max_length", type=int, default=None, help="tokens per pair (default: the model's own)"
    )
    parser.add_argument(
        "--batch_size", type=int, default=32, help="pairs per forward pass within one request"
    )
    args, _ = parser.parse_known_args()
    model = CrossEncoderModel(args.model_name, args.model_dir, args.max_length, args.batch_size)
    ModelServer(http_port=args.http_port, enable_grpc=args.enable_grpc).start([model])


if __name__ == "__main__":
    main()
