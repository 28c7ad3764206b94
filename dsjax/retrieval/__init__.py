"""Retrieval-augmented code completion: snippets cut from a code corpus, a BM25 and/or dense (the model's own hidden
states) index over them, prompts with the retrieved snippets prepended, and exact match with and without retrieval.

  python -m dsjax.retrieval build --source=stdlib --split=train --out=INDEX --kind=bm25
  python -m dsjax.retrieval search --index=INDEX --k=5 "def read_config(path):"
  python -m dsjax.retrieval evaluate --checkpoint=CKPT --index=INDEX --k=2
"""
from dsjax.retrieval.index import Hit, RetrievalIndex, load_index
from dsjax.retrieval.prompt import augment_prompt, build_query, fit_augmented
from dsjax.retrieval.snippets import Snippet, corpus_snippets, document_snippets

__all__ = ['Hit', 'RetrievalIndex', 'Snippet', 'augment_prompt', 'build_query', 'corpus_snippets',
           'document_snippets', 'fit_augmented', 'load_index']
