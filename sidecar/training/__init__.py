"""Training the rerank stage's cross-encoder offline (`sidecar train-reranker`), never on the
request path: `data` builds what is trained and validated on (splits, mined negatives, pseudo-
queries from the corpus), `fit` trains with sentence-transformers, `selection` chooses how the
result is served (blend weight, learned final scorer, rerank depth) on validation queries,
`card` writes the model card, and `recipe` runs the whole command.
"""

# The judgments of the held-out queries, written beside the model for `sidecar eval --qrels`
# (here, free of imports, for the command line's help).
HELDOUT_QRELS = "heldout-qrels.tsv"
