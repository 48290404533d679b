"""The runtime rule and what names a cached export, without exporting anything."""

from __future__ import annotations

import pytest

from sidecar.config import RerankRuntime
from sidecar.rerank.runtimes import available_runtimes, export_key, select_runtime


def test_the_test_environment_has_every_runtime() -> None:
    assert available_runtimes() == ["torch", "onnx", "openvino"]


AMX = frozenset({"avx512f", "amx_bf16", "amx_tile"})
PLAIN = frozenset({"avx2"})


@pytest.mark.parametrize(
    ("device", "flags", "expected"),
    [
        ("cuda", PLAIN, "torch"),
        ("cuda:1", AMX, "torch"),
        ("cpu", AMX, "torch"),
        ("cpu", PLAIN, "openvino"),
    ],
)
def test_auto_at_full_precision_by_device_and_cpu_units(
    device: str, flags: frozenset[str], expected: str
) -> None:
    assert select_runtime("auto", device, "none", flags) == expected


def test_auto_int8_is_onnx_runtime_dynamic_and_openvino_static() -> None:
    assert select_runtime("auto", "cpu", "dynamic", PLAIN) == "onnx"
    assert select_runtime("auto", "cpu", "static", AMX) == "openvino"


@pytest.mark.parametrize("runtime", ["torch", "onnx", "openvino"])
def test_an_explicit_runtime_is_kept_on_cpu(runtime: RerankRuntime) -> None:
    assert select_runtime(runtime, "cpu", "none") == runtime


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_exports_are_refused_on_cuda(runtime: RerankRuntime) -> None:
    with pytest.raises(ValueError, match="runs on CPU; use torch on cuda"):
        select_runtime(runtime, "cuda", "none")
    with pytest.raises(ValueError, match="runs on CPU"):
        select_runtime("auto", "cuda", "dynamic", PLAIN)


def test_int8_on_torch_is_refused() -> None:
    with pytest.raises(ValueError, match="needs the onnx or openvino backend"):
        select_runtime("torch", "cpu", "dynamic")


def test_the_export_key_follows_model_quantization_and_calibration() -> None:
    pairs = [("q", "a document")]
    key = export_key("model@abc", "static", pairs)
    assert key == export_key("model@abc", "static", list(pairs)), "stable"
    assert key != export_key("model@abd", "static", pairs)
    assert key != export_key("model@abc", "dynamic", pairs)
    assert key != export_key("model@abc", "static", [("q", "another document")])
    assert export_key("model@abc", "dynamic", pairs) == export_key("model@abc", "dynamic", [])
