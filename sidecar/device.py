"""Which torch device the models run on."""

from __future__ import annotations


def select_device(requested: str) -> str:
    """`auto` means CUDA when torch sees a GPU, else CPU; anything else is passed through.

    Raises ValueError when CUDA is requested but torch sees no GPU.
    """
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but torch sees no CUDA GPU")
    return requested
