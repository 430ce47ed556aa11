"""Hallucination metrics for generated image descriptions: CHAIR and POPE.

Both work on plain strings and ground-truth object sets, so they can score any
model's answers without loading it.
"""
from csr_plugin.eval.chair import chair, object_recall, per_response
from csr_plugin.eval.objects import ObjectVocabulary
from csr_plugin.eval.pope import PopeQuestion, build_pope, cooccurrence_counts, parse_yes_no, pope_metrics

__all__ = ["ObjectVocabulary", "chair", "per_response", "object_recall",
           "PopeQuestion", "build_pope", "cooccurrence_counts", "parse_yes_no", "pope_metrics"]
