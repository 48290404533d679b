from pathlib import Path

import pytest

from sidecar.config import LocalNodeSettings, Settings, SettingsError


def test_defaults_when_environment_is_empty() -> None:
    settings = Settings.from_env({"HOME": "/home/u"})
    assert settings.opensearch_url == "http://127.0.0.1:9200"
    assert settings.embedding_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert settings.local_node.http_port == 9200
    assert settings.cache_dir.name == "opensearch-sidecar"


def test_reads_typed_values() -> None:
    settings = Settings.from_env(
        {
            "SIDECAR_OPENSEARCH_URL": "https://user:secret@search:9200",
            "SIDECAR_EMBEDDING_BATCH_SIZE": "8",
            "SIDECAR_OPENSEARCH_PORT": "9333",
            "SIDECAR_OPENSEARCH_ALLOW_UNVERIFIED": "yes",
            "SIDECAR_CACHE_DIR": "/tmp/c",
            "XDG_CACHE_HOME": "/ignored",
        }
    )
    assert settings.embedding_batch_size == 8
    assert settings.local_node == LocalNodeSettings(http_port=9333, allow_unverified=True)
    assert settings.cache_dir == Path("/tmp/c")
    assert settings.redacted()["opensearch_url"] == "https://***@search:9200"


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
        ("SIDECAR_EMBEDDING_DTYPE", "int8", "one of auto, float32, bfloat16, float16"),
        ("SIDECAR_EMBEDDING_BATCH_SIZE", "0", "positive integer"),
        ("SIDECAR_OPENSEARCH_ALLOW_UNVERIFIED", "maybe", "expected true/false"),
        ("SIDECAR_OPENSEARCH_PROT", "9200", "unknown setting(s) SIDECAR_OPENSEARCH_PROT"),
    ],
)
def test_bad_values_say_what_to_fix(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env({name: value})
