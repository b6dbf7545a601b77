"""Reading chat records: the original medcap files unchanged, and the clean form."""

from __future__ import annotations

import json

import pytest
from helpers import draw_jpeg

from medcap.data.sharegpt import RecordError, parse_meta, read_records, record_to_chat


def _texts(message):
    return [c["content"] if c["type"] == "text" else "<IMG>" for c in message.content]


def test_original_record_with_meta_dir(tmp_path, monkeypatch):
    imgs = tmp_path / "datasets" / "SLAKE" / "imgs"
    draw_jpeg(imgs / "xmlab1" / "source.jpg")
    rec = {
        "conversations": [
            {"from": "human", "value": "Describe the image in a detailed and informative manner."},
            {"from": "gpt", "value": "A chest CT."},
        ],
        "image": "xmlab1/source.jpg",
        "meta": "dir=./datasets/SLAKE/imgs",
    }
    monkeypatch.chdir(tmp_path)  # the original ran from the repository root
    chat = record_to_chat(rec, 0, source=tmp_path / "datasets" / "medcap" / "slake_train.json")
    assert chat.images == [imgs.relative_to(tmp_path) / "xmlab1" / "source.jpg"]
    user, assistant = chat.messages
    assert _texts(user) == ["<IMG>", "Describe the image in a detailed and informative manner."]
    assert user.masked and not assistant.masked


def test_meta_values_may_hold_equals_and_semicolons():
    assert parse_meta("dir=/data/a=b;c/imgs;split=train") == {"dir": "/data/a=b;c/imgs", "split": "train"}
    assert parse_meta("dir=/x") == {"dir": "/x"}
    with pytest.raises(ValueError, match="not key=value"):
        parse_meta("nonsense")


def test_empty_meta_is_text_only(tmp_path):
    rec = {
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
        "image": "",
        "meta": "",
    }
    assert record_to_chat(rec, 0, source=tmp_path / "d.json").images == []


@pytest.mark.parametrize(
    "value, expected",
    [
        ("<image>\nWhat is shown?", ["<IMG>", "\nWhat is shown?"]),
        ("What is shown? <image>", ["What is shown? ", "<IMG>"]),
        ("\u2460" * 32 + "\n\nWhat is shown?", ["<IMG>", "What is shown?"]),
        ("What is shown?", ["<IMG>", "What is shown?"]),
    ],
)
def test_image_position(value, expected, tmp_path):
    rec = {
        "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "x"}],
        "image": "a.jpg",
    }
    chat = record_to_chat(rec, 0, source=tmp_path / "d.json")
    assert _texts(chat.messages[0]) == expected
    assert chat.images == [tmp_path / "a.jpg"]  # clean form: relative to the data file


def test_clean_jsonl_with_messages_and_metadata(tmp_path):
    lines = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Q?"},
                {"role": "assistant", "content": "A."},
            ],
            "images": ["/abs/x.png"],
            "qid": 7,
            "answer_type": "CLOSED",
            "content_type": "Modality",
        },
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    rec = read_records(path)[0]
    chat = record_to_chat(rec, 0, source=path, train_on_input=True)
    assert [m.role for m in chat.messages] == ["system", "user", "assistant"]
    assert not any(m.masked for m in chat.messages)
    assert chat.metadata == {"qid": 7, "answer_type": "CLOSED", "content_type": "Modality"}
    assert str(chat.images[0]) == "/abs/x.png"


def test_new_system_prompt_replaces_the_records(tmp_path):
    rec = {
        "conversations": [
            {"from": "system", "value": "old"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
        ]
    }
    chat = record_to_chat(rec, 0, source=tmp_path / "d.json", new_system_prompt="new")
    assert [(m.role, m.text_content) for m in chat.messages] == [
        ("system", "new"),
        ("user", "q"),
        ("assistant", "a"),
    ]


def test_malformed_input_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": []}\n{"conversations": [\n')
    with pytest.raises(RecordError, match=r"bad.jsonl, line 2: malformed JSON"):
        read_records(bad)
    arr = tmp_path / "bad.json"
    arr.write_text('[{"a": 1},\n {"b": ]')
    with pytest.raises(RecordError, match=r"bad.json: malformed JSON at line 2"):
        read_records(arr)
    with pytest.raises(RecordError, match=r"d.json, record 4: expected a non-empty 'conversations'"):
        record_to_chat({"conversations": []}, 4, source=tmp_path / "d.json")
    with pytest.raises(RecordError, match=r"record 2, turn 1: unknown role"):
        record_to_chat(
            {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
            2,
            source=tmp_path / "d.json",
        )
    with pytest.raises(RecordError, match="more image markers than images"):
        record_to_chat(
            {
                "conversations": [
                    {"from": "human", "value": "<image><image>"},
                    {"from": "gpt", "value": "a"},
                ],
                "image": "a.jpg",
            },
            0,
            source=tmp_path / "d.json",
        )
    with pytest.raises(RecordError, match="no assistant turn"):
        record_to_chat({"conversations": [{"from": "human", "value": "q"}]}, 0, source=tmp_path / "d.json")
