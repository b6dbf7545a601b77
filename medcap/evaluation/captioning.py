"""Caption metrics through pycocoevalcap: PTB tokenizer, BLEU-1..4, METEOR, ROUGE-L, CIDEr.

SPICE is not computed: it downloads Stanford CoreNLP on first use, which fails offline. CIDEr
weights n-grams by document frequency over the evaluated references, so its value depends on the
evaluated set: the item count is reported beside it. One reference per image, as in medcap's
captioning sets.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

from medcap.errors import MedcapError

SPICE_SKIPPED = "SPICE skipped: it downloads Stanford CoreNLP at first use, and runs offline here"


class JavaMissingError(MedcapError, RuntimeError):
    """pycocoevalcap's PTB tokenizer and METEOR run Java."""


def require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise JavaMissingError(
            "caption metrics need Java (pycocoevalcap runs the PTB tokenizer and METEOR on it): "
            "install a JRE, e.g. `apt-get install default-jre-headless`, or run `make test` once"
        )
    return java


def caption_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus-level scores of ``predictions`` against one reference each, plus ``n``."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no captions to score")
    require_java()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": str(r)}] for i, r in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": str(p) or "."}] for i, p in enumerate(predictions)})
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for k, value in enumerate(bleu, start=1):
        scores[f"BLEU-{k}"] = float(value)
    meteor = Meteor()  # a Java subprocess, ended by its __del__
    scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
    del meteor
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    scores["n"] = len(predictions)
    return scores
