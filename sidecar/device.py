"""Which torch device and dtype the models run on."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")
# CPU features with native bf16 matrix arithmetic; without them bf16 is emulated and slower than fp32.
_CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


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


def select_dtype(
    requested: str, device: str, cpu_flags: frozenset[str] | None = None
) -> torch.dtype:
    """`auto`: float16 on CUDA; bfloat16 on CPUs with native bf16 units (AMX, AVX512-BF16), which
    runs MiniLM-size transformers about 3x faster than float32 there; float32 otherwise."""
    import torch

    if requested != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            requested
        ]
    if device.startswith("cuda"):
        return torch.float16
    flags = read_cpu_flags() if cpu_flags is None else cpu_flags
    return torch.bfloat16 if flags & _CPU_BF16_FLAGS else torch.float32


def read_cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports; empty where /proc/cpuinfo is absent."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()
