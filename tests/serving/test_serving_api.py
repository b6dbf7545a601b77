"""The OpenAI client against a live server on loopback (plain, streamed, image, text-only,
multi-turn): answers equal to ``medcap.decoding.generate``; sampling, stops and lengths; bf16."""

from __future__ import annotations

import torch
from serving_helpers import client, ct_small, image_question, serve_cfg
from torchtune.data import Message

from medcap.evaluation.tasks import user_message
from medcap.serving.server import BackgroundServer, load


def test_openai_client_plain_streamed_image_text_multiturn(server, ref, ws):
    c = client(server)
    name = c.models.list().data[0].id
    assert name == "medcap-llm-meta_model_0"
    img, question = ws["images"] / "scan0.png", "What modality is this image?"
    expected = ref.ids([user_message(img, question)], [img], 8)
    reply = c.chat.completions.create(model=name, messages=image_question(img, question), max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == ref.tokenizer.decode(expected) and expected
    assert reply.model == name and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens == len(expected)
    assert reply.usage.prompt_tokens == len(ref.prompt([user_message(img, question)]))

    chunks = list(c.chat.completions.create(model=name, messages=image_question(img, question), max_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == reply.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected) and not chunks[-1].choices

    # text only: the LLM alone (so the server can be a judge)
    text_q = "Is this a CT scan of the chest?"
    only = c.chat.completions.create(model=name, messages=[{"role": "user", "content": text_q}], max_tokens=8)
    assert only.choices[0].message.content == ref.answer([Message(role="user", content=text_q)], [], 8)

    # a follow-up about the same image: the client resends the conversation, image included
    first = reply.choices[0].message.content
    follow = [*image_question(img, question), {"role": "assistant", "content": first},
              {"role": "user", "content": "Is it normal?"}]  # fmt: skip
    again = c.chat.completions.create(model=name, messages=follow, max_tokens=6)
    turns = [user_message(img, question), Message(role="assistant", content=first),
             Message(role="user", content="Is it normal?")]  # fmt: skip
    assert again.choices[0].message.content == ref.answer(turns, [img], 6)

    # DICOM as a browser sends a .dcm file (no type): recognised by its bytes
    dcm = c.chat.completions.create(model=name, messages=image_question(ct_small(), "Which organ?",
                                                                       "application/octet-stream"), max_tokens=5)
    assert dcm.choices[0].message.content == ref.answer([user_message(ct_small(), "Which organ?")], [ct_small()], 5)


def test_sampling_stop_and_length(server, ref, ws):
    c = client(server)
    img = ws["images"] / "scan1.png"
    messages = image_question(img, "Describe the image.")
    greedy = c.chat.completions.create(messages=messages, model="medcap-llm-meta_model_0", max_tokens=12)
    text = greedy.choices[0].message.content
    assert len(text) >= 3
    cut = c.chat.completions.create(messages=messages, model=greedy.model, max_tokens=12, stop=[text[1:3]])
    assert cut.choices[0].message.content == text[: text.find(text[1:3])]
    assert cut.choices[0].finish_reason == "stop"
    short = c.chat.completions.create(messages=messages, model=greedy.model, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    sampled = [c.chat.completions.create(messages=messages, model=greedy.model, max_tokens=10, temperature=1.0,
                                         seed=7).choices[0].message.content for _ in range(2)]  # fmt: skip
    assert sampled[0] == sampled[1]  # a seed reproduces a sampled answer
    nucleus = c.chat.completions.create(messages=messages, model=greedy.model, max_tokens=12, temperature=1.0,
                                        top_p=1e-6, seed=3)  # fmt: skip
    assert nucleus.choices[0].message.content == text  # the smallest nucleus is the greedy token



def test_serving_in_bf16_on_cpu(ws):
    """dtype=bf16 serves as evaluation runs: the LLM in bf16, the vision side fp32 under the
    worker thread's autocast; an image question is answered."""
    with BackgroundServer(load(serve_cfg(ws, "dtype=bf16", "log_level=error"))) as s:
        model = s.served.engine.model
        reply = client(s).chat.completions.create(
            model="medcap-llm-meta_model_0", messages=image_question(ws["images"] / "scan0.png", "What is this?"),
            max_tokens=4)
        assert reply.choices[0].finish_reason in ("stop", "length")
    assert {p.dtype for p in model.decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.visual.parameters()} == {torch.float32}
