from sidecar.indexing.sample import sample_documents


def test_the_sample_corpus_holds_each_text_once_under_unique_ids() -> None:
    documents = list(sample_documents())
    texts = [d.text for d in documents]
    assert len(set(texts)) == len(texts)
    assert len({d.id for d in documents}) == len(documents)
