"""Two-stage retrieval sidecar for OpenSearch: hybrid first stage, cross-encoder rerank, provenance."""
