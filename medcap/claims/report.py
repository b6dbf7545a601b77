"""Per-item scores of the two models -> paired differences, verdicts, ``claims.json`` and
``claims.html``."""

from __future__ import annotations

import html
import json
import platform
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medcap.claims.probes import TEXT_PROMPTS, TextPrompt
from medcap.claims.stats import MIN_ITEMS, paired_interval, verdict
from medcap.claims.variants import LORA_ALPHA, LORA_MODULES, LORA_RANK, VARIANTS
from medcap.io import atomic_write, atomic_write_json

# (claim, what it asks, the measure its verdict rests on, every measure shown under it)
CLAIMS = [
    ("vqa", "answers VQA questions though trained on captions only", "vqa_all",
     ["vqa_all", "vqa_closed", "vqa_open"]),
    ("reworded", "answers questions worded in ways never seen in training", "reworded_all",
     ["reworded_all", "reworded_closed", "reworded_open", "rewording_change"]),
    ("text", "keeps the LLM's own text abilities (no image)", "text", ["text"]),
    ("captions", "captions, what both were trained for", "caption_rouge_l", ["caption_rouge_l", "caption_cider"]),
]  # fmt: skip
MEASURES = {
    "vqa_all": "test questions right (closed: exact; open: answer-token recall)",
    "vqa_closed": "closed questions: accuracy",
    "vqa_open": "open questions: answer-token recall",
    "reworded_all": "reworded questions right (as above)",
    "reworded_closed": "reworded closed questions: accuracy",
    "reworded_open": "reworded open questions: recall",
    "rewording_change": "score on the reworded question minus on the original (per question)",
    "text": "plain-text prompts the untouched LLM gets right: still right",
    "caption_rouge_l": "test captions: ROUGE-L per caption",
    "caption_cider": "test captions: CIDEr per caption (corpus IDF)",
}


def question_scores(rows: dict[int, dict[str, str]], answer_type: str | None = None) -> dict[int, float]:
    """Per question: closed 1/0, open the answer-token recall (``score`` column of the CSV)."""
    out = {}
    for index, row in rows.items():
        kind = row.get("answer_type", "").upper()
        if answer_type and kind != answer_type:
            continue
        score = json.loads(row["score"])
        out[index] = score["correct"] if kind == "CLOSED" else score["recall"]
    return out


def caption_scores(rows: dict[int, dict[str, str]]) -> dict[str, dict[int, float]]:
    """ROUGE-L and CIDEr of each caption (pycocoevalcap; CIDEr's IDF from these references)."""
    if not rows:
        return {"caption_rouge_l": {}, "caption_cider": {}}
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from medcap.evaluation.captioning import require_java

    require_java()
    keys = sorted(rows)
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": rows[k]["output"]}] for k in keys})
    res = tok.tokenize({k: [{"caption": rows[k]["generated"] or "."}] for k in keys})
    _, rouge = Rouge().compute_score(gts, res)
    _, cider = Cider().compute_score(gts, res)
    return {"caption_rouge_l": dict(zip(keys, map(float, rouge))), "caption_cider": dict(zip(keys, map(float, cider)))}


def per_item(result: dict[str, Any], kept_text: list[int],
             prompts: list[TextPrompt] = TEXT_PROMPTS) -> dict[str, dict[int, float]]:  # fmt: skip
    """Every measure's per-item scores for one model."""
    vqa, rew = result["vqa"], result["reworded"]
    original = question_scores(vqa)
    reworded = question_scores(rew)
    scores = {
        "vqa_all": original,
        "vqa_closed": question_scores(vqa, "CLOSED"),
        "vqa_open": question_scores(vqa, "OPEN"),
        "reworded_all": reworded,
        "reworded_closed": question_scores(rew, "CLOSED"),
        "reworded_open": question_scores(rew, "OPEN"),
        "rewording_change": {k: reworded[k] - original[k] for k in original if k in reworded},
        "text": {i: float(prompts[i].check(result["text"][i])) for i in kept_text},
    }
    return scores | caption_scores(result["captions"])


def compare(results: dict[str, dict[str, Any]], untouched: list[str],
            prompts: list[TextPrompt] = TEXT_PROMPTS) -> dict[str, Any]:  # fmt: skip
    """(a) frozen - (b) LoRA per measure, on the items both answered, and a verdict per claim;
    ``untouched`` and each result's ``text`` are the replies to ``prompts``, in order."""
    kept = [i for i, p in enumerate(prompts) if p.check(untouched[i])]
    frozen, adapted = per_item(results["frozen"], kept, prompts), per_item(results["lora"], kept, prompts)
    measures: dict[str, Any] = {}
    for name, description in MEASURES.items():
        items = sorted(set(frozen[name]) & set(adapted[name]))
        if not items:
            measures[name] = {"description": description, "n": 0, "verdict": "no items"}
            continue
        interval = paired_interval([frozen[name][i] for i in items], [adapted[name][i] for i in items])
        measures[name] = {"description": description, **interval, "verdict": verdict(interval)}
    claims = [
        {"claim": key, "question": question, "measure": primary, "verdict": measures[primary]["verdict"],
         "measures": shown}
        for key, question, primary, shown in CLAIMS
    ]  # fmt: skip
    return {"measures": measures, "claims": claims, "text_prompts_kept": kept}


def write_claims(work: Path, plan: Any, chosen: dict, results: dict, untouched: list[str], table: dict,
                 seconds: float, prompts: list[TextPrompt] = TEXT_PROMPTS) -> dict[str, Any]:  # fmt: skip
    """``claims.json`` (every figure) and ``claims.html`` (the table, the prompts, the replies)."""
    summary = {
        "what": "medcap (LLM frozen) vs the LLM adapted with LoRA, both trained on image-caption pairs only",
        "variants": VARIANTS,
        "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "modules": list(LORA_MODULES)},
        "plan": asdict(plan),
        "learning_rates": {v: {"chosen": c["lr"], "checkpoint": str(c["checkpoint"]), "grid": c["runs"]}
                           for v, c in chosen.items()},  # fmt: skip
        "caption_metrics": {v: r["caption_metrics"] for v, r in results.items()},
        **table,
        "text_prompts": [
            {"kind": p.kind, "prompt": p.prompt, "expected": p.expected, "untouched": untouched[i],
             "frozen": results["frozen"]["text"][i], "lora": results["lora"]["text"][i],
             "kept": i in table["text_prompts_kept"]}
            for i, p in enumerate(prompts)
        ],  # fmt: skip
        "machine": f"{platform.machine()}, {_cpu_name()}, {_cores()} cores",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(seconds, 1),
    }
    atomic_write_json(work / "claims.json", summary, indent=2)
    page = claims_html(summary)
    atomic_write(work / "claims.html", lambda f: f.write(page.encode("utf-8")))
    print("\n" + "\n".join(claims_lines(summary)) + f"\n\n{work / 'claims.json'}\n{work / 'claims.html'}", flush=True)
    return summary


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _fmt(m: dict[str, Any], key: str) -> str:
    return "n/a" if key not in m else f"{m[key]:+.3f}" if key == "difference" else f"{m[key]:.3f}"


def claims_lines(summary: dict[str, Any]) -> list[str]:
    lines = ["claim / measure | n | (a) frozen | (b) LoRA | (a)-(b) [95% CI] | verdict"]
    for claim in summary["claims"]:
        lines.append(f"{claim['question']}: {claim['verdict'].upper()}")
        for name in claim["measures"]:
            m = summary["measures"][name]
            ci = f"[{m['ci_low']:+.3f}, {m['ci_high']:+.3f}]" if m["n"] else ""
            lines.append(f"  {name} | {m['n']} | {_fmt(m, 'frozen')} | {_fmt(m, 'adapted')} | "
                         f"{_fmt(m, 'difference')} {ci} | {m['verdict']}")  # fmt: skip
    return lines


def claims_html(summary: dict[str, Any]) -> str:
    e = html.escape
    rows = []
    for claim in summary["claims"]:
        rows.append(f"<tr class=claim><td colspan=6><b>{e(claim['question'])}</b>: {e(claim['verdict'])}</td></tr>")
        for name in claim["measures"]:
            m = summary["measures"][name]
            ci = f"[{m['ci_low']:+.3f}, {m['ci_high']:+.3f}]" if m["n"] else ""
            rows.append(f"<tr><td>{e(m['description'])}</td><td>{m['n']}</td><td>{_fmt(m, 'frozen')}</td>"
                        f"<td>{_fmt(m, 'adapted')}</td><td>{_fmt(m, 'difference')} {ci}</td><td>{e(m['verdict'])}</td></tr>")  # fmt: skip
    prompts = "".join(
        f"<tr><td>{e(p['kind'])}</td><td>{e(p['prompt'])}</td><td>{e(p['expected'])}</td><td>{e(p['untouched'])}</td>"
        f"<td>{e(p['frozen'])}</td><td>{e(p['lora'])}</td><td>{'yes' if p['kept'] else 'no'}</td></tr>"
        for p in summary["text_prompts"]
    )
    lrs = "; ".join(
        f"{e(v)}: {c['chosen']:g} (" + ", ".join(f"{r['lr']:g}: CIDEr {_num(r['val_CIDEr'])}" for r in c["grid"]) + ")"
        for v, c in summary["learning_rates"].items()
    )
    variants = "".join(f"<li>{e(v)}</li>" for v in summary["variants"].values())
    return f"""<!doctype html><html><head><meta charset=utf-8><title>medcap: the seed's first claim</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}td,th{{border-bottom:1px solid #ddd;padding:.25em .5em;text-align:left}}
table{{border-collapse:collapse}}tr.claim td{{background:#f3f3f3}}</style></head><body>
<h1>Does a frozen LLM keep answering what it was never trained for?</h1>
<p>The demo's own report (the same mini SLAKE, the model trained on questions and captions):
<a href="../report.html">../report.html</a> (written by <code>make demo</code>).</p>
<p>Two models trained on the same image-caption pairs only (no questions), the same steps, each with its
learning rate picked on the validation captions:</p><ul>{variants}</ul>
<p>Learning rates (validation CIDEr): {lrs}.</p>
<p>Differences are (a) - (b) on the same test items with a 95% paired bootstrap interval; the verdict is
"frozen better" or "frozen worse" when the interval excludes zero, else "no clear difference";
"too few items" under {MIN_ITEMS} paired items, whatever the interval.
(a)'s LLM is untouched, so its plain-text replies are the untouched LLM's.</p>
<table><tr><th>measure</th><th>n</th><th>(a) frozen</th><th>(b) LoRA</th><th>(a) - (b) [95% CI]</th><th>verdict</th></tr>
{''.join(rows)}</table>
<h2>Plain-text prompts (no image)</h2>
<p>Kept: those the untouched SmolLM2 answers right.</p>
<table><tr><th>kind</th><th>prompt</th><th>expected</th><th>untouched</th><th>(a) frozen</th><th>(b) LoRA</th><th>kept</th></tr>
{prompts}</table>
<p>{e(summary['machine'])}, {e(summary['date'])}, {summary['seconds']:.0f} s; plan {e(json.dumps(summary['plan']))}.</p>
</body></html>
"""
