"""The runtime rule and what names a cached export, without exporting anything."""

from __future__ import annotations

import pytest

from sidecar.rerank.runtimes import available_runtimes, export_key, select_runtime

AMX = frozenset({"avx512f", "amx_bf16", "amx_tile"})
AVX512_BF16 = frozenset({"avx512f", "avx512_bf16"})
PLAIN = frozenset({"avx2"})


def test_the_test_environment_has_every_runtime() -> None:
    assert available_runtimes() == ["torch", "onnx", "openvino"]


@pytest.mark.parametrize(
    ("device", "flags", "expected"),
    [
        ("cuda", PLAIN, "torch"),
        ("cuda:1", AMX, "torch"),
        ("cpu", AMX, "torch"),
        ("cpu", AVX512_BF16, "onnx"),
        ("cpu", PLAIN, "onnx"),
    ],
)
def test_auto_picks_by_device_and_cpu_units(
    device: str, flags: frozenset[str], expected: str
) -> None:
    assert select_runtime("auto", device, flags) == expected


@pytest.mark.parametrize("runtime", ["torch", "onnx", "openvino"])
def test_an_explicit_runtime_is_kept_on_cpu(runtime: str) -> None:
    assert select_runtime(runtime, "cpu", PLAIN) == runtime  # type: ignore[arg-type]


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_exports_are_refused_on_cuda(runtime: str) -> None:
    with pytest.raises(ValueError, match="runs on CPU; use torch on cuda"):
        select_runtime(runtime, "cuda", PLAIN)  # type: ignore[arg-type]


def test_the_export_key_follows_model_quantization_and_calibration() -> None:
    pairs = [("q", "a document")]
    key = export_key("model@abc", "static", pairs)
    assert key == export_key("model@abc", "static", list(pairs)), "stable"
    assert key != export_key("model@abd", "static", pairs)
    assert key != export_key("model@abc", "dynamic", pairs)
    assert key != export_key("model@abc", "static", [("q", "another document")])
    assert export_key("model@abc", "dynamic", pairs) == export_key("model@abc", "dynamic", [])
