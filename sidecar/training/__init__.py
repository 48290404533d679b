"""Training the rerank stage's cross-encoder offline (`sidecar train-reranker`), never on the
request path: `data` builds what is trained and validated on (splits, mined negatives, pseudo-
queries from the corpus), `fit` trains with sentence-transformers, `selection` chooses how the
result is served (blend weight, learned final scorer, rerank depth) on validation queries,
`cross_fit` on every judged query out of fold instead, `card` writes the model card, and
`recipe` runs the whole command.
"""

# The judgments of the held-out queries, written beside the model for `sidecar eval --qrels`
# (here, free of imports, for the command line's help).
HELDOUT_QRELS = "heldout-qrels.tsv"

# A validation share of fewer queries than this leaves a mean gain's interval too wide to choose
# by (about +-0.03 nDCG@10 for 36 queries): Cranfield's 36 showed the blend +0.026 with its
# interval above 0, and it lost 0.02 on queries held out. Below it, train-reranker cross-fits by
# default (`cross_fit.default_folds`), in DEFAULT_FOLDS folds.
FEW_VALIDATION_QUERIES = 100
DEFAULT_FOLDS = 5
