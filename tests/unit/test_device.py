import torch

from sidecar.device import read_cpu_flags, select_dtype


def test_auto_dtype_uses_bf16_only_on_cpus_with_native_bf16_units() -> None:
    assert select_dtype("auto", "cpu", frozenset({"avx2", "amx_bf16"})) is torch.bfloat16
    assert select_dtype("auto", "cpu", frozenset({"avx512_bf16"})) is torch.bfloat16
    assert select_dtype("auto", "cpu", frozenset({"avx2", "avx512f"})) is torch.float32
    assert select_dtype("auto", "cuda", frozenset()) is torch.float16


def test_explicit_dtype_wins() -> None:
    assert select_dtype("float32", "cpu", frozenset({"amx_bf16"})) is torch.float32
    assert select_dtype("bfloat16", "cuda") is torch.bfloat16


def test_cpu_flags_are_read_from_this_machine() -> None:
    assert "fpu" in read_cpu_flags()
