"""Every published way of scoring SLAKE / VQA-RAD answers, by name, reimplemented from the peer's
code and cross-checked against it (``tests/test_protocols.py``; ``docs/protocols.md``).

``score_protocols(rows, names, dataset)`` gives each protocol's open / closed / overall figures;
``resolve(names)`` reads the ``protocols`` setting (None: every rule-based one).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from medcap.errors import ConfigError
from medcap.evaluation.protocols import llava_med, lmms_eval, medcap, medevalkit, multimedeval
from medcap.evaluation.protocols.base import Protocol

PROTOCOLS: dict[str, Protocol] = {
    m.PROTOCOL.name: m.PROTOCOL for m in (medcap, lmms_eval, multimedeval, medevalkit, llava_med)
}
# None means these: every protocol whose scores come from rules alone; medevalkit's figures are its
# rule-based part (its open-question judge is marked, not run)
DEFAULT = tuple(PROTOCOLS)


def resolve(names: Any) -> tuple[str, ...]:
    """The ``protocols`` setting as protocol names: None for the default, a name, a
    comma-separated text or a list; an unknown name is a ConfigError naming the closest."""
    if names is None:
        return DEFAULT
    if isinstance(names, str):
        names = [n for n in names.replace("[", "").replace("]", "").split(",")]
    if not isinstance(names, (list, tuple)):
        raise ConfigError(f"protocols={names!r}: expected a list of names from {', '.join(PROTOCOLS)}")
    out = []
    for raw in names:
        name = str(raw).strip().strip("'\"")
        if not name:
            continue
        if name not in PROTOCOLS:
            close = difflib.get_close_matches(name, list(PROTOCOLS), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"protocols: no protocol named {name!r}{hint}; known: {', '.join(PROTOCOLS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigError(f"protocols={names!r}: no protocol named; known: {', '.join(PROTOCOLS)}")
    return tuple(out)


def score_protocols(rows: Iterable[Mapping[str, Any]], names: Iterable[str] = DEFAULT,
                    dataset: str = "slake") -> dict[str, dict[str, Any]]:  # fmt: skip
    """``{protocol: {open, closed, overall, counts, metric names, ...}}`` for the same answers."""
    rows = list(rows)
    return {name: PROTOCOLS[name].score(rows, dataset) for name in names}


__all__ = ["DEFAULT", "PROTOCOLS", "Protocol", "resolve", "score_protocols"]
