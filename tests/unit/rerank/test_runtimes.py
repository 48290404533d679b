"""The runtime rule and what names a cached export, without exporting anything."""

from __future__ import annotations

import pytest

from sidecar.config import Quantization, RerankRuntime
from sidecar.rerank.runtimes import available_runtimes, export_key, select_runtime


def test_the_test_environment_has_every_runtime() -> None:
    assert available_runtimes() == ["torch", "onnx", "openvino"]


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_auto_is_torch_at_full_precision(device: str) -> None:
    assert select_runtime("auto", device, "none") == "torch"


@pytest.mark.parametrize("quantization", ["dynamic", "static"])
def test_auto_is_onnx_runtime_for_int8(quantization: Quantization) -> None:
    assert select_runtime("auto", "cpu", quantization) == "onnx"


@pytest.mark.parametrize("runtime", ["torch", "onnx", "openvino"])
def test_an_explicit_runtime_is_kept_on_cpu(runtime: RerankRuntime) -> None:
    assert select_runtime(runtime, "cpu", "none") == runtime


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_exports_are_refused_on_cuda(runtime: RerankRuntime) -> None:
    with pytest.raises(ValueError, match="runs on CPU; use torch on cuda"):
        select_runtime(runtime, "cuda", "none")
    with pytest.raises(ValueError, match="runs on CPU"):
        select_runtime("auto", "cuda", "dynamic")


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
