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
