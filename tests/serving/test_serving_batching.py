"""Continuous batching: 16 concurrent clients batched and equal to one at a time; rows
joining a running batch decode exactly as alone; the one sampler's nucleus and seeds."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from serving_helpers import N, client, image_question

from medcap.decoding import ContinuousBatch, Row, Sampling, generate
from medcap.decoding.sampling import nucleus_mask, pick


def test_16_concurrent_clients_batched_and_equal_to_one_at_a_time(server, ws):
    c = client(server)
    questions = ["What modality is this?", "Which organ is shown?", "Describe the image.", "Is it abnormal?"]
    jobs = [dict(messages=image_question(ws["images"] / f"scan{i % 4}.png", questions[i // 4]), max_tokens=4 + i % 5)
            for i in range(12)]  # fmt: skip
    jobs += [dict(messages=[{"role": "user", "content": q}], max_tokens=6 + k) for k, q in enumerate(questions)]
    jobs += [dict(messages=image_question(ws["images"] / "scan3.png", "Colour?"), max_tokens=9, temperature=0.8,
                  seed=11)]  # a seeded sample decodes the same beside others  # fmt: skip

    def ask(job):
        r = c.chat.completions.create(model="medcap-llm-meta_model_0", **job)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    alone = [ask(job) for job in jobs]
    before = batch_histogram(server)
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(ask, jobs))
    assert together == alone
    after = batch_histogram(server)
    over = lambda h, size: h["count"] - h[f"{size:.1f}"]  # noqa: E731 - decode steps with more rows than size
    assert over(after, 1) > over(before, 1)  # batches larger than 1
    assert over(after, 4) > over(before, 4)  # most of the 17 decoded together at some step


def batch_histogram(server, headers=None) -> dict[str, float]:
    """``medcap_batch_size`` from /metrics: observations (decode steps) per bucket, and the count."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", headers=headers).text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "medcap_batch_size")
    out = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    out["count"] = next(s.value for s in family.samples if s.name.endswith("_count"))
    return out


def test_continuous_batching_equals_generate_with_staggered_joins(ref):
    """Rows joining a running batch (and one cache compaction) decode exactly as alone."""
    model, g, image = ref.model, torch.Generator().manual_seed(3), ref.model.image_token_id
    body = lambda n: torch.randint(5, 390, (n,), generator=g).tolist()  # noqa: E731
    img = [torch.randn(1, 3, 64, 64, generator=g) for _ in range(3)]
    prompts = [[1, *[image] * N, *body(9)], [1, *body(3)], [1, *body(2), *[image] * N, *body(4)], [1, *body(20)],
               [1, *[image] * N, *body(1)]]  # fmt: skip
    images = [img[0], None, img[1], None, img[2]]
    lengths = [12, 5, 9, 15, 7]
    alone = [generate(model, [p], im, max_new_tokens=m, stop_tokens=[2], pad_id=0)[0]
             for p, im, m in zip(prompts, images, lengths)]  # fmt: skip
    batch = ContinuousBatch(model, pad_id=0)
    rows = [Row(p, im, m, owner=k) for k, (p, im, m) in enumerate(zip(prompts, images, lengths))]
    out: dict[int, list[int]] = {k: [] for k in range(5)}

    def take(row, tok):
        if tok != 2:
            out[row.owner].append(tok)
        if tok == 2 or len(out[row.owner]) == row.max_new_tokens:
            batch.release(row)

    for row, tok in zip(rows[:2], batch.admit(rows[:2])):
        take(row, tok)
    joins, step = {2: rows[2:3], 3: rows[3:5]}, 0
    while batch.live or joins:
        step += 1
        for row, tok in zip(joins.get(step, []), batch.admit(joins.pop(step, []))):
            take(row, tok)
        if step == 6:
            batch.compact()
        for row, tok in batch.step():
            take(row, tok)
    assert [out[k] for k in range(5)] == alone
    assert batch.batch is None and all(c is None for c in batch.caches.current())  # freed when empty


def test_nucleus_and_seeded_sampling():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert nucleus_mask(logits, 0.7).tolist() == [[False, False, True, True]]  # 0.5 + 0.3 reaches 0.7
    assert nucleus_mask(logits, 0.5).tolist() == [[False, True, True, True]]
    assert nucleus_mask(logits, 1e-9).tolist() == [[False, True, True, True]]
    draws = lambda **kw: {int(pick(logits, Sampling(1.0, rng=torch.Generator().manual_seed(s), **kw))[0])  # noqa: E731
                          for s in range(200)}  # fmt: skip
    assert draws(top_p=0.7) == {0, 1} and draws() == {0, 1, 2, 3} and draws(top_k=1) == {0}
    assert draws(banned=(0,)) == {1, 2, 3} and int(pick(logits, Sampling(banned=(0, 1)))[0]) == 2
