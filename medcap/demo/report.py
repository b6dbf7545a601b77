"""The demo's report: metrics before and after training, the reference rates a blind answerer
reaches, the loss curve, and a gallery of held-out test images with the answers before and after.
``report.html`` is self-contained (images inlined), ``summary.png`` is its figure, and
``summary.json`` holds the same numbers.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from medcap.data.sources import read_slake
from medcap.demo.image_reading import (
    BlindAnswerer,
    harness_prompt,
    image_reading,
    reading_html,
    reading_lines,
    verdicts,
)
from medcap.demo.probe import probe_html, probe_lines
from medcap.demo.slake import MODALITY_WORDS, PLANE_NAMES, modality_question, plane_question
from medcap.evaluation.vqa import closed_correct, first_word, is_yes_no, normalize_answer, score_item
from medcap.io import atomic_write, atomic_write_json
from medcap.models.checkpoints import read_vision_checkpoint, safe_load
from medcap.training import RECIPE_STATE

TABLE = (  # (key, label, count key)
    ("closed_accuracy", "Closed-question accuracy", "closed_n"),
    ("closed_yes_no_accuracy", "  yes/no questions", "closed_yes_no_n"),
    ("yes_no_implied_accuracy", "  yes/no via own open answer", "yes_no_implied_n"),
    ("yes_no_agreement", "  yes/no agreeing with that", "yes_no_implied_n"),
    ("yes_no_agreement_kappa", "  (Cohen's kappa)", "yes_no_implied_n"),
    ("closed_choice_accuracy", "  choice questions (X or Y?)", "closed_choice_n"),
    ("open_recall", "Open-question recall", "open_n"),
    ("open_f1", "Open-question token F1", "open_n"),
    ("open_exact_match", "Open-question exact match", "open_n"),
    ("bleu4", "Caption BLEU-4", "caption_n"),
    ("meteor", "Caption METEOR", "caption_n"),
    ("rouge_l", "Caption ROUGE-L", "caption_n"),
    ("cider", "Caption CIDEr", "caption_n"),
)
REFERENCES = (  # (key, label, count key): what answering without looking scores
    ("majority_rate", "Majority answer (closed)", "closed_n"),
    ("yes_no_majority_rate", "  yes/no questions", "closed_yes_no_n"),
    ("question_prior_rate", "Blind answerer (closed)", "closed_n"),
    ("yes_no_prior_rate", "  yes/no questions", "closed_yes_no_n"),
    ("choice_prior_rate", "  choice questions", "closed_choice_n"),
)


def flat_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics_{ckpt}.json`` (VQA under "slake", captions under "captions") -> the summary's keys."""
    vqa, cap = metrics.get("slake", {}), metrics.get("captions", {})
    out = {k: vqa.get(k) for k in ("closed_accuracy", "closed_n", "open_recall", "open_f1", "open_exact_match", "open_n")}
    out.update(bleu4=cap.get("BLEU-4"), meteor=cap.get("METEOR"), rouge_l=cap.get("ROUGE-L"), cider=cap.get("CIDEr"),
               caption_n=cap.get("n", 0))  # fmt: skip
    out["protocols"] = vqa.get("protocols", {})  # the same answers under each paper's protocol
    out["by_content_type"] = {
        k: {"closed_accuracy": v["closed_accuracy"], "closed_n": v["closed_n"], "open_recall": v["open_recall"],
            "open_n": v["open_n"]}
        for k, v in vqa.get("by_content_type", {}).items()
    }  # fmt: skip
    return out


def closed_kinds(rows: dict[int, dict[str, str]]) -> dict[str, Any]:
    """Closed accuracy split into SLAKE's two kinds: yes/no, and choice ("X or Y?")."""
    out: dict[str, Any] = {}
    closed = [r for r in rows.values() if r["answer_type"] == "CLOSED"]
    for kind, keep in (("yes_no", True), ("choice", False)):
        part = [r for r in closed if is_yes_no(r["output"]) == keep]
        out[f"closed_{kind}_n"] = len(part)
        out[f"closed_{kind}_accuracy"] = (
            sum(closed_correct(r["generated"], r["output"]) for r in part) / len(part) if part else None
        )
    return out


IMPLIED = {  # content type -> (the open answer's options, the yes/no question that option makes)
    "Modality": (tuple(MODALITY_WORDS), modality_question),
    "Plane": (tuple(PLANE_NAMES.values()), plane_question),
}


def implied_yes_no(rows: dict[int, dict[str, str]]) -> dict[str, Any]:
    """The yes/no answers the model's own open answer about the same image implies ("What
    modality ...?" -> "MRI" implies Yes to "Is this an MRI?", No to the others; an open answer
    that names no option implies No throughout). Their accuracy is what a perfect comparison of
    image and question would score with what the model recognises; how often the model's real
    yes/no answers agree with them (and Cohen's kappa, which discounts agreement by chance) says
    whether it makes that comparison at all."""
    from sklearn.metrics import cohen_kappa_score

    named: dict[tuple[str, str], str | None] = {}
    for r in rows.values():
        if r["answer_type"] == "OPEN" and r["content_type"] in IMPLIED:
            options = IMPLIED[r["content_type"]][0]
            said = normalize_answer(r["generated"])
            named[r["image"], r["content_type"]] = next((o for o in options if normalize_answer(o) == said), None)
    gold, implied, answered = [], [], []
    for r in rows.values():
        key = (r["image"], r["content_type"])
        if r["answer_type"] != "CLOSED" or not is_yes_no(r["output"]) or key not in named:
            continue
        option = named[key]
        matches = option is not None and r["instruction"] == IMPLIED[r["content_type"]][1](option)
        gold.append(normalize_answer(r["output"]))
        implied.append("yes" if matches else "no")
        answered.append(first_word(r["generated"]))
    n = len(gold)
    if not n:
        return {"yes_no_implied_accuracy": None, "yes_no_implied_n": 0, "yes_no_agreement": None,
                "yes_no_agreement_kappa": None}  # fmt: skip
    one_label = len(set(implied) | set(answered)) < 2  # kappa is undefined
    return {
        "yes_no_implied_accuracy": sum(g == i for g, i in zip(gold, implied)) / n,
        "yes_no_implied_n": n,
        "yes_no_agreement": sum(a == i for a, i in zip(answered, implied)) / n,
        "yes_no_agreement_kappa": None if one_label else float(cohen_kappa_score(implied, answered)),
    }


def majority_rate(test_answers: list[str]) -> float:
    """Accuracy of the best constant answer on the closed test questions."""
    counts = Counter(normalize_answer(a) for a in test_answers)
    return max(counts.values()) / sum(counts.values()) if counts else 0.0


def question_prior_rate(train: list[tuple[str, str]], test: list[tuple[str, str]]) -> float:
    """Accuracy on closed test questions of a blind answerer that saw the training set: for each
    question text, the answer most often right in training (a tie counts half for each)."""
    seen: dict[str, Counter] = defaultdict(Counter)
    for q, a in train:
        seen[q][normalize_answer(a)] += 1
    overall = Counter(normalize_answer(a) for _, a in train)
    total = 0.0
    for q, a in test:
        counts = seen.get(q) or overall
        top = max(counts.values())
        best = [ans for ans, c in counts.items() if c == top]
        total += sum(closed_correct(ans, a) for ans in best) / len(best)
    return total / len(test) if test else 0.0


def reference_rates(slake_root: Path) -> dict[str, float]:
    """What answering without looking scores on the closed test questions."""
    closed = {
        split: [(it.prompt, it.answer) for it in read_slake(slake_root, split) if it.extra["answer_type"] == "CLOSED"]
        for split in ("train", "test")
    }
    def kind(pairs: list[tuple[str, str]], yes_no: bool) -> list[tuple[str, str]]:
        return [(q, a) for q, a in pairs if is_yes_no(a) == yes_no]

    return {
        "majority_rate": majority_rate([a for _, a in closed["test"]]),
        "yes_no_majority_rate": majority_rate([a for _, a in kind(closed["test"], True)]),
        "question_prior_rate": question_prior_rate(closed["train"], closed["test"]),
        "yes_no_prior_rate": question_prior_rate(kind(closed["train"], True), kind(closed["test"], True)),
        "choice_prior_rate": question_prior_rate(kind(closed["train"], False), kind(closed["test"], False)),
    }


def vqa_summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    rows = evaluation["outputs"].rows("slake")
    return {**flat_metrics(evaluation["metrics"]), **closed_kinds(rows), **implied_yes_no(rows)}


def loss_history(checkpoint_dir: Path) -> list[tuple[int, float]]:
    state = checkpoint_dir / RECIPE_STATE
    return [(int(s), float(v)) for s, v in safe_load(state).get("history", [])] if state.is_file() else []


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def metrics_table(summary: dict[str, Any]) -> str:
    b, t = summary["baseline"], summary["trained"]
    lines = [f"{'metric':<28} {'before':>8} {'after':>8}   n"]
    for key, label, n in TABLE:
        lines.append(f"{label:<28} {_fmt(b.get(key)):>8} {_fmt(t.get(key)):>8}   {t.get(n)}")
    for key, label, _ in REFERENCES:
        lines.append(f"{label:<28} {_fmt(summary[key]):>8}")
    lines.append("(blind answerer: the best answer per question text, fitted on train)")
    return "\n".join(lines + protocol_lines(summary))


def _protocol_rows(summary: dict[str, Any]) -> list[tuple[str, str, str, str, str, str, str, str]]:
    """(protocol, open before, open after, closed before, closed after, overall before, overall after, note)."""
    b, t = summary["baseline"].get("protocols", {}), summary["trained"].get("protocols", {})
    return [
        (name, _fmt(b.get(name, {}).get("open")), _fmt(p["open"]), _fmt(b.get(name, {}).get("closed")),
         _fmt(p["closed"]), _fmt(b.get(name, {}).get("overall")), _fmt(p["overall"]),
         f"open: {p['open_metric']}; closed: {p['closed_metric']}" + ("; open judge needed" if p.get("judge") else ""))
        for name, p in t.items()
    ]  # fmt: skip


def protocol_lines(summary: dict[str, Any]) -> list[str]:
    rows = _protocol_rows(summary)
    if not rows:
        return []
    lines = [f"\n{'protocol (docs/protocols.md)':<28} {'open':>15} {'closed':>15} {'overall':>15}"]
    lines += [f"{r[0]:<28} {r[1]:>6} -> {r[2]:<5} {r[3]:>6} -> {r[4]:<5} {r[5]:>6} -> {r[6]:<5}" for r in rows]
    return lines


# ------------------------------------------------------------------ figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def summary_figure(summary: dict[str, Any], history: list[tuple[int, float]], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=110)
    groups = (("VQA (held-out test)", ("closed_accuracy", "closed_yes_no_accuracy", "yes_no_implied_accuracy",
                                       "closed_choice_accuracy", "open_recall", "open_f1")),
              ("Captions (held-out test)", ("bleu4", "rouge_l", "cider")))  # fmt: skip
    labels = {"closed_accuracy": "closed", "closed_yes_no_accuracy": "yes/no", "yes_no_implied_accuracy": "yes/no via\nopen answer", "closed_choice_accuracy": "choice",
              "open_recall": "open recall", "open_f1": "open F1", "bleu4": "BLEU-4", "rouge_l": "ROUGE-L",
              "cider": "CIDEr"}  # fmt: skip
    for ax, (title, keys) in zip(axes[:2], groups):
        xs = range(len(keys))
        for offset, (name, colour) in zip((-0.2, 0.2), (("baseline", "#b0b0b0"), ("trained", "#2a7ab9"))):
            values = [summary[name].get(k) or 0.0 for k in keys]
            bars = ax.bar([x + offset for x in xs], values, width=0.4, color=colour,
                          label="untrained" if name == "baseline" else "trained")  # fmt: skip
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_xticks(list(xs), [labels[k] for k in keys], fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].axhline(summary["majority_rate"], color="#c0392b", ls="--", lw=1, label="majority answer (closed)")
    axes[0].axhline(summary["question_prior_rate"], color="#8e44ad", ls=":", lw=1, label="blind answerer (closed)")
    axes[0].set_ylim(0, 1.08)
    axes[0].legend(fontsize=8, loc="upper right")
    ax = axes[2]
    if history:
        steps, losses = zip(*history)
        ax.plot(steps, losses, lw=1, color="#2a7ab9")
    ax.set_title("training loss (answer tokens)")
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _data_uri(path: Path, max_side: int | None = None) -> str:
    if max_side is None:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    from PIL import Image

    img = Image.open(path).convert("RGB")
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


# ------------------------------------------------------------------ HTML
CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}.good{color:#1e7b34}.bad{color:#b03a2e}
.card{display:flex;gap:14px;border:1px solid #ddd;border-radius:6px;padding:10px;margin:10px 0}
.card img{width:160px;height:160px;object-fit:contain;background:#000}
.card table{margin:0;font-size:13px}.muted{color:#777;font-size:13px}
"""


def _indent(label: str) -> str:
    return label.replace("  ", "&nbsp;&nbsp;")


def _mark(prediction: str, gold: str, answer_type: str) -> str:
    """Green when the metric counts it right (open: every gold word present, recall 1)."""
    score = score_item(prediction, gold, answer_type)
    ok = score["correct"] == 1.0 if answer_type == "CLOSED" else score["recall"] == 1.0
    return f'<span class="{"good" if ok else "bad"}">{html.escape(prediction or "(empty)")}</span>'


def gallery(baseline: dict[str, Any], trained: dict[str, Any]) -> str:
    before, after = baseline["outputs"].rows("slake"), trained["outputs"].rows("slake")
    def by_path(rows: dict[int, dict[str, str]]) -> dict[Path, dict[str, str]]:
        return {Path(r["image"]).resolve(): r for r in rows.values()}

    caps_before = by_path(baseline["outputs"].rows("captions"))
    caps_after = by_path(trained["outputs"].rows("captions"))
    by_image: dict[Path, list[int]] = defaultdict(list)
    for i, row in after.items():
        by_image[Path(row["image"]).resolve()].append(i)
    cards = []
    for image, indices in by_image.items():
        rows = ["<tr><th>question</th><th>gold</th><th>before</th><th>after</th></tr>"]
        for i in sorted(indices):
            a, b = after[i], before.get(i, {})
            rows.append(
                f"<tr><td>{html.escape(a['instruction'])}</td><td>{html.escape(a['output'])}</td>"
                f"<td>{_mark(b.get('generated', ''), a['output'], a['answer_type'])}</td>"
                f"<td>{_mark(a['generated'], a['output'], a['answer_type'])}</td></tr>"
            )
        if image in caps_after:
            c = caps_after[image]
            rows.append(
                f"<tr><td>caption</td><td>{html.escape(c['output'])}</td>"
                f"<td>{html.escape(caps_before.get(image, {}).get('generated', ''))}</td><td>{html.escape(c['generated'])}</td></tr>"
            )
        uri = _data_uri(image, 320) if image.is_file() else ""
        cards.append(
            f'<div class="card"><div><img src="{uri}" alt=""><div class="muted">{html.escape(image.parent.name)}'
            f'</div></div><table>{"".join(rows)}</table></div>'
        )
    return "\n".join(cards)


def protocol_table(summary: dict[str, Any]) -> str:
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r[:7]) + f"<td class=\"muted\">{html.escape(r[7])}</td></tr>"
        for r in _protocol_rows(summary)
    )
    if not rows:
        return ""
    return ("<h3>The same answers under each paper's protocol</h3><table><tr><th>protocol</th><th>open before</th>"
            "<th>open after</th><th>closed before</th><th>closed after</th><th>overall before</th><th>overall after</th>"
            f"<th>what is measured</th></tr>{rows}</table><p class=\"muted\">Papers score SLAKE under different rules "
            "(docs/protocols.md); compare a paper's figure with this model's under the paper's protocol.</p>")  # fmt: skip


def probe_section(probe: dict[str, Any] | None) -> str:
    if not probe:
        return ""
    return "<h2>Does training against the frozen LLM give better image features?</h2>" + probe_html(probe)


# the demo's report and make claims' report (demo_output/claims/claims.html) point at each other
CLAIMS_LINK = """<h2>Does a frozen LLM keep answering what it was never trained for?</h2>
<p>The seed's first claim, medcap against the same vision side with the LLM adapted by LoRA, both trained on
these captions only: <a href="claims/claims.html">claims/claims.html</a> (written by <code>make claims</code>
into this folder; docs/claims.md in the repository).</p>"""


def write_html(path: Path, summary: dict[str, Any], figure: Path, baseline: dict, trained: dict) -> Path:
    b, t = summary["baseline"], summary["trained"]
    rows = "".join(
        f"<tr><td>{_indent(label)}</td><td>{_fmt(b.get(k))}</td><td>{_fmt(t.get(k))}</td><td>{t.get(n)}</td></tr>"
        for k, label, n in TABLE
    )
    references = "".join(
        f"<tr><td>{_indent(label)}</td><td colspan=\"2\">{_fmt(summary[k])}</td><td>{t.get(n)}</td></tr>"
        for k, label, n in REFERENCES
    )
    content_rows = "".join(
        f"<tr><td>{html.escape(ct)}</td><td>{_fmt(b['by_content_type'].get(ct, {}).get('closed_accuracy'))}</td>"
        f"<td>{_fmt(v['closed_accuracy'])}</td><td>{v['closed_n']}</td><td>{_fmt(b['by_content_type'].get(ct, {}).get('open_recall'))}</td>"
        f"<td>{_fmt(v['open_recall'])}</td><td>{v['open_n']}</td></tr>"
        for ct, v in t["by_content_type"].items()
    )  # fmt: skip
    train = summary["training"]
    llm = "bitwise unchanged" if train.get("llm_unchanged") else "CHANGED (a bug: please report)"
    data = summary["dataset"]
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>medcap demo</title><style>{CSS}</style></head><body>
<h1>medcap demo: a frozen SmolLM2-135M-Instruct learns to read medical images</h1>
<p>Only a small ViT ({html.escape(str(train.get('vision')))}) and its connector were trained
({train.get('steps')} optimizer steps, {train.get('seconds', 0):.0f} s on this machine); the LLM's weights are
<b>{llm}</b>. The mini SLAKE is built from images shipped in Python packages (pydicom, pydicom-data, nibabel,
nilearn): {data.get('train_images')} training images, {data.get('test_images')} held-out test images that share
no source file or volume with training. Metrics are on the test split; nothing was tuned on it.</p>
<img src="{_data_uri(figure)}" style="width:100%" alt="summary figure">
<h2>Metrics (held-out test)</h2>
<table><tr><th>metric</th><th>untrained</th><th>trained</th><th>n</th></tr>{rows}
{references}</table>
<p class="muted">Blind answerer: the best answer for each question text, fitted on the training set.</p>
{protocol_table(summary)}
<h3>By content type</h3>
<table><tr><th>content type</th><th>closed before</th><th>closed after</th><th>n</th><th>open recall before</th><th>open recall after</th><th>n</th></tr>{content_rows}</table>
<p class="muted">Compare each kind of closed question with the blind answerer's rate for it: only what
exceeds that comes from reading the image. "Yes/no via own open answer" scores the yes/no answers
that the model's own open answer about the same image implies ("MRI" to "What modality ...?" implies Yes to "Is
this an MRI?"): what a perfect comparison of image and question would reach with what the model recognises.
How often the real yes/no answers agree with those (Cohen's kappa: 0 is chance agreement) says whether the
model compares at all.
Closed answers are right when the first word is the gold yes/no; open recall is the share of the
gold answer's words found in the answer (LLaVA-Med's measure). Captions: pycocoevalcap (SPICE skipped).
Greedy decoding. Total run {summary['seconds'].get('total', 0):.0f} s.</p>
{reading_html(summary) if "image_reading" in summary else ""}
{probe_section(summary.get("probe"))}
{CLAIMS_LINK}
<h2>Held-out test images</h2>
{gallery(baseline, trained)}
</body></html>"""
    atomic_write(path, lambda f: f.write(doc.encode("utf-8")))
    return path


def write_report(paths: Any, baseline: dict[str, Any], trained: dict[str, Any], timings: dict[str, float],
                 probe: dict[str, Any] | None = None, harness: dict[str, Any] | None = None) -> dict:  # fmt: skip
    """summary.json, summary.png and report.html under ``paths.root``; prints the table."""
    history = loss_history(paths.checkpoints)
    frozen = paths.trained / "frozen_llm.json"
    frozen_check = json.loads(frozen.read_text()) if frozen.is_file() else {}
    counts_file = paths.slake / "demo_counts.json"
    meta = read_vision_checkpoint(trained["checkpoint"]).meta if trained.get("checkpoint") else {}
    summary = {
        "baseline": vqa_summary(baseline),
        "trained": vqa_summary(trained),
        **reference_rates(paths.slake),
        "training": {
            "steps": history[-1][0] if history else 0,
            "final_loss": history[-1][1] if history else None,
            "seconds": timings.get("train"),
            "vision": f"{meta.get('encoder')} + {meta.get('connector')}, {meta.get('num_image_tokens')} image tokens",
            "llm_unchanged": frozen_check.get("unchanged"),
            "llm_fingerprint": frozen_check.get("after"),
        },
        "dataset": json.loads(counts_file.read_text()) if counts_file.is_file() else {},
        "probe": probe or {},
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    rows = list(trained["outputs"].rows("slake").values())
    summary["image_reading"] = image_reading(rows, BlindAnswerer.from_slake(paths.slake))
    if harness is not None:
        summary["harness_prompt"] = harness_prompt(rows, list(harness["outputs"].rows("slake").values()), harness["suffix"])
    summary["targets"] = verdicts(summary["image_reading"], summary.get("harness_prompt"), probe)
    atomic_write_json(paths.root / "summary.json", summary, indent=2)
    figure = summary_figure(summary, history, paths.root / "summary.png")
    report = write_html(paths.root / "report.html", summary, figure, baseline, trained)
    print("\n" + metrics_table(summary))
    print("\n".join(reading_lines(summary)))
    if probe:
        print("\n".join(probe_lines(probe)))
    print(f"\nLLM weights: {'bitwise unchanged' if summary['training']['llm_unchanged'] else 'CHANGED'}")
    print(f"report: {report}\nsummary: {paths.root / 'summary.json'}, {figure}")
    return summary
