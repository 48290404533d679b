"""Two-stage retrieval sidecar for OpenSearch: hybrid first stage, cross-encoder rerank, provenance."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("opensearch-rerank-sidecar")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
