"""End of sentence, derived from the tokenizer instead of a hard-coded token id.

The official code stops at LLaMA token 29889 ('.'). Byte-level BPE vocabularies
merge the period into other tokens ('.\n', '."', ').'), so we mark every token
whose text ends a sentence: a delimiter at its end (ignoring trailing spaces,
quotes and brackets) or followed by whitespace inside it. A token such as '.5'
or 'e.g' is not an end. The mask is computed once per tokenizer.
"""
from __future__ import annotations

import re
from typing import Sequence

_CLOSERS = "\"')]}\u201d\u2019"


def _ends_sentence_pattern(delimiters: Sequence[str]) -> re.Pattern:
    alternatives = "|".join(re.escape(d) for d in sorted(delimiters, key=len, reverse=True))
    return re.compile(rf"(?:{alternatives})[{re.escape(_CLOSERS)}]*(?:\s|$)")


def ends_sentence(text: str, delimiters: Sequence[str]) -> bool:
    return bool(_ends_sentence_pattern(delimiters).search(text))


def sentence_spans(text: str, delimiters: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans [start, end) of the sentences of ``text``.

    A sentence ends where the text so far ends with a delimiter (closing quotes or
    brackets allowed) followed by whitespace or the end, as ``ends_sentence``
    decides in the search ('3.5' does not end one). Whitespace goes to the next
    sentence; a trailing fragment without delimiter is a last sentence, a
    whitespace-only tail is none.
    """
    spans, start = [], 0
    for end in range(1, len(text) + 1):
        if (end == len(text) or text[end].isspace()) and ends_sentence(text[start:end], delimiters):
            spans.append((start, end))
            start = end
    if text[start:].strip():
        spans.append((start, len(text)))
    return spans


def sentence_end_token_ids(tokenizer, delimiters: Sequence[str]) -> set[int]:
    """Ids of every vocabulary token whose decoded text ends a sentence."""
    pattern = _ends_sentence_pattern(delimiters)
    ids = set()
    vocab_size = len(tokenizer)
    for token_id in range(vocab_size):
        text = tokenizer.decode([token_id], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text and pattern.search(text):
            ids.add(token_id)
    if not ids:
        raise ValueError(f"no token of this tokenizer ends a sentence with delimiters {list(delimiters)!r}; "
                         "set search.delimiters to characters the tokenizer can produce.")
    return ids
