"""Retrieval augmentation: the pipeline's hook that prepends retrieved documents to a training document.

`RetrievalAugmenter` is the interface; `NoRetrieval` (the default, data.retrieval="none") returns documents unchanged.
"""
from __future__ import annotations

from typing import Protocol

from cm3jax.data.documents import Document


class RetrievalAugmenter(Protocol):
    def __call__(self, record_index: int, document: Document, meta: dict) -> Document:
        """Returns the document to train on: retrieved documents first, the query document last."""


class NoRetrieval:
    def __call__(self, record_index: int, document: Document, meta: dict) -> Document:
        return document
