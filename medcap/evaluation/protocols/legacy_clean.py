"""The answer cleaning that LLaVA-Med (``normalize_word``) and MultiMedEval (``clean_str``) both
took from an early VQA evaluation script, with the quirks that decide their scores:

- a punctuation mark (of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``) is deleted where the text
  has it next to a space, or anywhere once the text holds a digit-comma-digit, and else becomes a
  space: "x-ray" is "x ray", but "x-ray - chest" is "xray chest";
- every full stop not followed by a digit is deleted ("x.ray" is "xray", "2.5" stays), the first
  32 of them only (the peers pass ``re.UNICODE`` where ``re.sub`` takes its count);
- ``:``, ``'``, ``*`` and ``#`` stay (``yes:`` is not ``yes``);
- number words zero..ten (and "none") become digits, articles go, VQA's contractions apply (its
  four capitalised keys, "Im", "Ive", "Id've", "I'dve", never match lowercased text), and every
  remaining comma is deleted.
"""

from __future__ import annotations

import re

from medcap.evaluation.vqa import ARTICLES, CONTRACTIONS, NUMBER_WORDS

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_FULL_STOP = re.compile(r"\.(?!\d)")
_CONTRACTIONS = {k: v for k, v in CONTRACTIONS.items() if k not in {"im", "ive", "id've", "i'dve"}}


def legacy_clean(text: str) -> str:
    text = text.lower()
    has_number_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCT:  # the test reads the text before any replacement, as the peers do
        out = out.replace(p, "" if has_number_comma or p + " " in text or " " + p in text else " ")
    out = _FULL_STOP.sub("", out, count=32)
    words = [NUMBER_WORDS.get(w, w) for w in out.split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words).replace(",", "")
