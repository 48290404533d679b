"""What a response tells callers about the reranker."""

from pathlib import Path

from sidecar.api.responses import public_model_name


def test_a_local_model_is_named_by_its_folder_not_its_path(tmp_path: Path) -> None:
    model = tmp_path / "models" / "domain-reranker"
    model.mkdir(parents=True)
    assert public_model_name(str(model)) == "domain-reranker"
    assert public_model_name("cross-encoder/ms-marco-MiniLM-L6-v2") == (
        "cross-encoder/ms-marco-MiniLM-L6-v2"
    )
