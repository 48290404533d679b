from pathlib import Path

import pytest

from sidecar.config import LocalNodeSettings, Settings, SettingsError


def test_defaults_when_environment_is_empty() -> None:
    settings = Settings.from_env({"HOME": "/home/u"})
    assert settings.opensearch_url == "http://127.0.0.1:9200"
    assert (settings.listen_host, settings.listen_port) == ("127.0.0.1", 8080)
    assert settings.embedding_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert settings.reranker_model == "cross-encoder/ms-marco-MiniLM-L-6-v2"
    assert settings.local_node.port == 9200
    assert settings.cache_dir.name == "opensearch-sidecar"


def test_reads_typed_values() -> None:
    settings = Settings.from_env(
        {
            "SIDECAR_OPENSEARCH_URL": "https://search:9200",
            "SIDECAR_EMBEDDING_BATCH_SIZE": "8",
            "SIDECAR_RERANK_MAX_WAIT_S": "0.01",
            "SIDECAR_RERANKER_MAX_LENGTH": "256",
            "SIDECAR_FAIL_MODE": "closed",
            "SIDECAR_OPENSEARCH_PORT": "9333",
            "SIDECAR_OPENSEARCH_ALLOW_UNVERIFIED": "yes",
            "SIDECAR_CACHE_DIR": "/tmp/c",
            "XDG_CACHE_HOME": "/ignored",
        }
    )
    assert settings.embedding_batch_size == 8
    assert settings.rerank_max_wait_s == 0.01
    assert settings.reranker_max_length == 256
    assert settings.fail_mode == "closed"
    assert settings.local_node == LocalNodeSettings(port=9333, allow_unverified=True)
    assert settings.cache_dir == Path("/tmp/c")
    assert settings.redacted()["opensearch_url"] == "https://search:9200"


def test_config_file_is_overridden_by_environment(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text(
        'listen_port = 9000\nnormalization = "zscore"\nalpha = 0.7\n'
        "[local_opensearch]\nport = 9400\n"
    )
    settings = Settings.from_env(
        {"SIDECAR_CONFIG_FILE": str(config), "SIDECAR_LISTEN_PORT": "9001"}
    )
    assert settings.listen_port == 9001
    assert settings.normalization == "zscore"
    assert settings.alpha == 0.7
    assert settings.local_node.port == 9400


def test_config_file_errors_name_the_problem(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text("listen_prot = 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'listen_prot'"):
        Settings.from_env({"SIDECAR_CONFIG_FILE": str(config)})
    config.write_text("listen_port = [")
    with pytest.raises(SettingsError, match="is not valid TOML"):
        Settings.from_env({"SIDECAR_CONFIG_FILE": str(config)})
    with pytest.raises(SettingsError, match="cannot read"):
        Settings.from_env({"SIDECAR_CONFIG_FILE": str(tmp_path / "absent.toml")})


def test_cache_dir_follows_xdg() -> None:
    assert Settings.from_env({"XDG_CACHE_HOME": "/x"}).cache_dir == Path("/x/opensearch-sidecar")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SIDECAR_OPENSEARCH_PORT", "abc", "SIDECAR_OPENSEARCH_PORT='abc' is not valid"),
        ("SIDECAR_OPENSEARCH_PORT", "70000", "must be 1-65535"),
        ("SIDECAR_OPENSEARCH_HEAP", "lots", "must look like 512m or 1g"),
        ("SIDECAR_OPENSEARCH_VERSION", "latest", "'auto' or X.Y.Z"),
        ("SIDECAR_OPENSEARCH_URL", "search:9200", "must start with http"),
        ("SIDECAR_DEVICE", "tpu", "auto, cpu, cuda"),
        ("SIDECAR_EMBEDDING_BATCH_SIZE", "0", "at least 1"),
        ("SIDECAR_EMBEDDING_DTYPE", "int8", "one of auto, float32, bfloat16, float16"),
        ("SIDECAR_FAIL_MODE", "maybe", "expected one of open, closed"),
        ("SIDECAR_ALPHA", "1.5", "between 0 and 1"),
        ("SIDECAR_REQUEST_TIMEOUT_S", "0", "must be positive"),
        ("SIDECAR_DEFAULT_CANDIDATES", "5000", "must not exceed SIDECAR_MAX_CANDIDATES"),
        ("SIDECAR_OPENSEARCH_ALLOW_UNVERIFIED", "maybe", "expected true/false"),
        ("SIDECAR_OPENSEARCH_PROT", "9200", "unknown setting(s) SIDECAR_OPENSEARCH_PROT"),
    ],
)
def test_bad_values_say_what_to_fix(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env({name: value})


def test_identity_settings_from_the_environment(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    settings = Settings.from_env(
        {
            "SIDECAR_FORWARD_HEADERS": "Authorization, securitytenant",
            "SIDECAR_SERVICE_USERNAME": "sidecar",
            "SIDECAR_SERVICE_PASSWORD_FILE": str(secret),
            "SIDECAR_UPSTREAM_IDENTITY": "service",
        }
    )
    assert settings.forward_headers == ("Authorization", "securitytenant")
    assert settings.service_password_value() == "s3cret"
    assert settings.redacted()["forward_headers"] == ["Authorization", "securitytenant"]


def test_the_service_password_is_masked_wherever_settings_are_shown() -> None:
    settings = Settings.from_env(
        {"SIDECAR_SERVICE_USERNAME": "sidecar", "SIDECAR_SERVICE_PASSWORD": "s3cret"}
    )
    assert settings.service_password_value() == "s3cret"
    assert settings.redacted()["service_password"] == "***"
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings.redacted())


@pytest.mark.parametrize(
    "url",
    [
        "https://admin:secret@search:9200",
        "https://search-1:9200,https://admin:secret@search-2:9200",
        "http://admin@search:9200",
    ],
)
def test_credentials_in_the_cluster_url_are_refused(url: str) -> None:
    # opensearch-py would send them on every first-stage call: in forward mode a caller
    # without Authorization would search as that user.
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"SIDECAR_OPENSEARCH_URL": url})
    message = str(refused.value)
    assert "SIDECAR_SERVICE_USERNAME" in message
    assert "SIDECAR_SERVICE_PASSWORD_FILE" in message
    assert "***@search" in message
    assert "secret" not in message
    assert "admin" not in message


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"SIDECAR_UPSTREAM_IDENTITY": "service"}, "needs SIDECAR_SERVICE_USERNAME"),
        ({"SIDECAR_FORWARD_HEADERS": "authorization,bad header"}, "must be header names"),
        (
            {"SIDECAR_SERVICE_PASSWORD": "a", "SIDECAR_SERVICE_PASSWORD_FILE": "/x"},
            "not both",
        ),
        ({"SIDECAR_UPSTREAM_IDENTITY": "admin"}, "expected one of forward, service"),
        ({"SIDECAR_SERVICE_AWS_REGION": "eu-west-1"}, "needs SIDECAR_UPSTREAM_IDENTITY=service"),
        (
            {
                "SIDECAR_UPSTREAM_IDENTITY": "service",
                "SIDECAR_SERVICE_AWS_REGION": "eu-west-1",
                "SIDECAR_SERVICE_USERNAME": "sidecar",
            },
            "cannot carry a signature and basic auth",
        ),
        (
            {
                "SIDECAR_UPSTREAM_IDENTITY": "service",
                "SIDECAR_SERVICE_AWS_REGION": "eu-west-1",
                "SIDECAR_SERVICE_AWS_SERVICE": "s3",
            },
            "expected one of es, aoss",
        ),
        ({"SIDECAR_LISTEN_TLS_CERT": "/x.pem"}, "go together"),
    ],
)
def test_identity_settings_that_cannot_work(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(environ)


@pytest.mark.parametrize(
    ("environ", "per_caller"),
    [
        ({}, True),  # forward mode: callers are told apart
        (
            {
                "SIDECAR_UPSTREAM_IDENTITY": "service",
                "SIDECAR_SERVICE_USERNAME": "sidecar",
                "SIDECAR_SERVICE_PASSWORD": "s3cret",
            },
            False,  # one identity for every caller: one cache
        ),
        ({"SIDECAR_SCORE_CACHE_PER_CALLER": "false"}, False),
    ],
)
def test_scores_are_cached_per_caller_in_forward_mode_unless_turned_off(
    environ: dict[str, str], per_caller: bool
) -> None:
    settings = Settings.from_env(environ)
    assert settings.caches_per_caller is per_caller
    assert settings.report_cache_stats is False, "cache figures are the operator's to turn on"


def test_the_caller_cache_key_is_a_secret() -> None:
    settings = Settings.from_env({"SIDECAR_SCORE_CACHE_CALLER_KEY": "k3y-material"})
    assert "k3y-material" not in repr(settings)
    assert "k3y-material" not in str(settings.redacted())


@pytest.mark.parametrize("port", ["0", "8080", "70000"])
def test_the_metrics_port_is_a_port_of_its_own(port: str) -> None:
    with pytest.raises(SettingsError, match="SIDECAR_METRICS_PORT"):
        Settings.from_env({"SIDECAR_METRICS_PORT": port, "SIDECAR_LISTEN_PORT": "8080"})


def test_a_remote_reranker_needs_its_url_and_first_truncation_and_hides_its_key(
    tmp_path: Path,
) -> None:
    with pytest.raises(SettingsError, match="needs SIDECAR_RERANKER_URL"):
        Settings.from_env({"SIDECAR_RERANKER_BACKEND": "tei"})
    with pytest.raises(SettingsError, match="must not hold credentials") as caught:
        Settings.from_env(
            {"SIDECAR_RERANKER_BACKEND": "tei", "SIDECAR_RERANKER_URL": "http://u:pw@tier:80"}
        )
    assert "pw" not in str(caught.value)
    with pytest.raises(SettingsError, match="SIDECAR_TRUNCATION must be first"):
        Settings.from_env(
            {
                "SIDECAR_RERANKER_BACKEND": "cohere",
                "SIDECAR_RERANKER_URL": "http://tier:7997",
                "SIDECAR_TRUNCATION": "max_chunk",
            }
        )
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    settings = Settings.from_env(
        {
            "SIDECAR_RERANKER_BACKEND": "kserve",
            "SIDECAR_RERANKER_URL": "https://tier:8080",
            "SIDECAR_RERANKER_API_KEY_FILE": str(key_file),
            "SIDECAR_RERANKER_SCORES": "probability",
        }
    )
    assert settings.reranker_api_key_value() == "s3cret"
    assert settings.reranker_scores == "probability"
    assert "s3cret" not in repr(settings.redacted())
    shown = Settings.from_env(
        {
            "SIDECAR_RERANKER_BACKEND": "kserve",
            "SIDECAR_RERANKER_URL": "https://tier:8080",
            "SIDECAR_RERANKER_API_KEY": "s3cret",
        }
    )
    assert "s3cret" not in repr(shown.redacted())
    assert "s3cret" not in repr(shown)
