import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import _build_parser, main
from sidecar.config import ENV_PREFIX


def test_a_missing_dataset_file_is_one_error_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "--dataset", str(tmp_path), "--index", "absent"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert str(tmp_path / "qrels" / "test.tsv") in err
    assert "Traceback" not in err


# What commands that need no model must not pay for at start (seconds of import).
HEAVY_MODULES = ("torch", "sentence_transformers", "transformers", "scipy")


def test_commands_that_need_no_model_start_without_torch_or_scipy(tmp_path: Path) -> None:
    script = (
        "import json, sys\n"
        "from sidecar.cli import main\n"
        "main(['opensearch', 'status', '--port', '9299'])\n"
        "main(['provenance', '--url', 'http://127.0.0.1:1'])\n"
        f"print(json.dumps(sorted(set(sys.modules) & set({HEAVY_MODULES!r}))))\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    completed = subprocess.run(
        [sys.executable, "-c", script],
        env={**environ, "SIDECAR_OPENSEARCH_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(completed.stdout.splitlines()[-1]) == []


@pytest.mark.parametrize(
    "command",
    [
        ["serve"],
        ["index", "create", "--index", "i"],
        ["index", "load", "--index", "i", "--corpus", "c"],
        ["demo"],
    ],
)
def test_opensearch_is_named_by_opensearch_and_the_former_url_still_works_with_a_warning(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    parser = _build_parser()
    assert parser.parse_args([*command, "--opensearch", "http://a:9200"]).opensearch_url == (
        "http://a:9200"
    )
    assert capsys.readouterr().err == ""
    assert parser.parse_args([*command, "--url", "http://b:9200"]).opensearch_url == (
        "http://b:9200"
    )
    warning = capsys.readouterr().err
    assert "--url is deprecated" in warning
    assert "use --opensearch URL" in warning


@pytest.mark.parametrize(
    "command",
    [
        ["provenance"],
        ["bench", "--index", "i"],
        ["soak", "--index", "i", "--queries", "q"],
        ["eval", "--dataset", "d", "--index", "i"],
        ["train-reranker", "--dataset", "d", "--index", "i", "--out", "o"],
    ],
)
def test_url_means_the_sidecar_everywhere_else(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = _build_parser().parse_args([*command, "--url", "http://127.0.0.1:8080"])
    assert args.sidecar_url == "http://127.0.0.1:8080"
    assert getattr(args, "opensearch_url", None) is None
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "--dataset", "d", "--index", "i"],
        ["bench", "--index", "i"],
        ["soak", "--index", "i", "--queries", "q.jsonl"],
        ["provenance", "--url", "http://127.0.0.1:8080"],
    ],
)
def test_commands_that_talk_to_a_sidecar_take_a_user_and_a_password_file(
    command: list[str], tmp_path: Path
) -> None:
    from sidecar.cli import _basic_auth

    secret = tmp_path / "password"
    secret.write_text("s3cret-pa55\n")
    args = _build_parser().parse_args(
        [*command, "--user", "reader", "--password-file", str(secret)]
    )
    header = _basic_auth(args.user, args.password_file)
    assert header == {"Authorization": "Basic cmVhZGVyOnMzY3JldC1wYTU1"}  # reader:s3cret-pa55
    with pytest.raises(ValueError, match="--user needs --password-file"):
        _basic_auth("reader", None)


def test_train_reranker_offers_every_head_and_defaults_to_the_fit_default() -> None:
    from sidecar.rerank.heads import HEADS
    from sidecar.training.fit import FitOptions

    command = ["train-reranker", "--dataset", "d", "--index", "i", "--out", "o"]
    parser = _build_parser()
    assert parser.parse_args(command).head == FitOptions().head
    for head in HEADS:
        assert parser.parse_args([*command, "--head", head]).head == head
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--head", "cls-linear"])


def test_train_reranker_offers_every_labelling_and_defaults_to_the_recipe_default() -> None:
    from typing import get_args

    from sidecar.training.data import Labels
    from sidecar.training.recipe import TrainOptions

    command = ["train-reranker", "--dataset", "d", "--index", "i", "--out", "o"]
    parser = _build_parser()
    assert parser.parse_args(command).labels == TrainOptions().labels
    for labels in get_args(Labels):
        assert parser.parse_args([*command, "--labels", labels]).labels == labels
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--labels", "ordinal"])


def test_train_reranker_offers_every_negative_sampling_and_defaults_to_the_recipe_default() -> None:
    from typing import get_args

    from sidecar.training.data import NegativeSampling
    from sidecar.training.recipe import TrainOptions

    command = ["train-reranker", "--dataset", "d", "--index", "i", "--out", "o"]
    parser = _build_parser()
    assert parser.parse_args(command).negative_sampling == TrainOptions().negative_sampling
    for sampling in get_args(NegativeSampling):
        assert parser.parse_args([*command, "--negative-sampling", sampling]).negative_sampling == (
            sampling
        )
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--negative-sampling", "random"])


@pytest.mark.parametrize("action", ["up", "down", "status"])
def test_every_opensearch_action_takes_a_version(action: str) -> None:
    parser = _build_parser()
    args = parser.parse_args(["opensearch", action, "--version", "2.19.1"])
    assert args.opensearch_version == "2.19.1"
    assert parser.parse_args(["opensearch", action]).opensearch_version is None


def test_a_malformed_opensearch_version_is_one_error_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["opensearch", "status", "--port", "9299", "--version", "latest"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "got 'latest'" in err
