"""docs/other-harnesses.md, tested: tools/lmms_eval_slake_task.py writes a valid offline lmms-eval
task for a local SLAKE folder, and (slow, when MEDCAP_LMMS_EVAL_PYTHON names the Python of a venv
with lmms-eval 0.7.3) lmms-eval's ``openai`` model evaluates a live ``medcap serve`` with it: every
question answered by the server, scored by lmms-eval's own slake scoring, which medcap's
``lmms_eval`` protocol reproduces."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import draw_jpeg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import lmms_eval_slake_task as slake_task  # noqa: E402

QUESTIONS = [  # (image, question, answer, answer_type, language)
    (1, "Is this a CT scan?", "Yes", "CLOSED", "en"),
    (1, "Which organ is shown?", "Liver", "OPEN", "en"),
    (2, "Is this an MRI?", "No", "CLOSED", "en"),
    (2, "这是什么器官?", "肝脏", "OPEN", "zh"),  # SLAKE's Chinese questions are left out
    (2, "What modality is this?", "CT", "OPEN", "en"),
]


@pytest.fixture
def slake(tmp_path) -> Path:
    """A SLAKE folder in SLAKE's own layout: imgs/xmlabN/source.jpg and the split files."""
    root = tmp_path / "Slake1.0"
    for n in (1, 2):
        draw_jpeg(root / "imgs" / f"xmlab{n}" / "source.jpg", seed=n)
    rows = [{"img_id": img, "img_name": f"xmlab{img}/source.jpg", "question": q, "answer": a, "answer_type": t,
             "q_lang": lang, "content_type": "Organ", "modality": "CT", "qid": i}
            for i, (img, q, a, t, lang) in enumerate(QUESTIONS)]  # fmt: skip
    for split in ("train", "test"):
        (root / f"{split}.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (root / "validation.json").write_text(json.dumps(rows[:2]), encoding="utf-8")  # the Hugging Face copy's name
    return root


class _Loader(yaml.SafeLoader):
    """lmms-eval's task YAML with its ``!function module.name`` tags kept as text."""


_Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))


def _load_utils(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("generated_task_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_task_files_are_valid(slake, tmp_path):
    out = tmp_path / "tasks"
    written = slake_task.write_task(slake, out)
    assert written["questions"] == 4  # the English ones
    cfg = yaml.load(written["yaml"].read_text(), Loader=_Loader)
    assert cfg["task"] == "medcap_slake" and cfg["output_type"] == "generate_until"
    assert cfg["dataset_path"] == "json" and cfg["test_split"] == "test"
    assert Path(cfg["dataset_kwargs"]["data_files"]["test"]) == written["data"] and written["data"].is_absolute()
    assert cfg["generation_kwargs"] == {"max_new_tokens": 32, "temperature": 0, "do_sample": False}  # as slake_en
    assert cfg["lmms_eval_specific_kwargs"]["default"]["post_prompt"] == "\nAnswer the question using a single word or phrase."
    utils = _load_utils(written["utils"])
    functions = [cfg[k][1] for k in ("doc_to_visual", "doc_to_text", "doc_to_messages", "process_results")]
    functions += [m["aggregation"][1] for m in cfg["metric_list"]]
    for ref in functions:
        module, name = ref.split(".")
        assert module == "utils" and callable(getattr(utils, name)), ref
    assert [m["metric"] for m in cfg["metric_list"]] == ["slake_accuracy", "slake_open_accuracy", "slake_closed_accuracy"]

    docs = [json.loads(line) for line in written["data"].read_text(encoding="utf-8").splitlines()]
    assert [d["question"] for d in docs] == [q for _, q, _, _, lang in QUESTIONS if lang == "en"]
    assert {d["answer_type"] for d in docs} == {"OPEN", "CLOSED"} and all(d["q_lang"] == "en" for d in docs)
    kwargs = cfg["lmms_eval_specific_kwargs"]["default"]
    assert utils.doc_to_text(docs[0], kwargs) == "Is this a CT scan?\nAnswer the question using a single word or phrase."
    image = utils.doc_to_visual(docs[0])[0]
    assert image.size == (64, 64) and image.mode == "RGB"
    (message,) = utils.doc_to_messages(docs[1], kwargs)
    assert [c["type"] for c in message["content"]] == ["image", "text"] and message["role"] == "user"


def test_task_tool_command_line(slake, tmp_path, capsys):
    assert slake_task.main(["--slake", str(slake), "--out", str(tmp_path / "t"), "--split", "val", "--limit", "1"]) == 0
    assert "1 questions; task medcap_slake" in capsys.readouterr().out
    assert len((tmp_path / "t" / "medcap_slake.jsonl").read_text().splitlines()) == 1


def test_task_tool_errors_name_the_file_and_record(slake, tmp_path, capsys):
    (slake / "imgs" / "xmlab2" / "source.jpg").unlink()
    assert slake_task.main(["--slake", str(slake), "--out", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err
    assert "test.json: record 2 (qid 2): no image" in err
    assert slake_task.main(["--slake", str(tmp_path / "nowhere"), "--out", str(tmp_path / "t")]) == 1
    assert "no test.json" in capsys.readouterr().err


# ------------------------------------------------------------------ live: lmms-eval against medcap serve
def _lmms_python() -> str:
    python = os.environ.get("MEDCAP_LMMS_EVAL_PYTHON")
    if not python:
        pytest.skip("MEDCAP_LMMS_EVAL_PYTHON is not set: name the python of a venv with lmms-eval 0.7.3 "
                    "(docs/other-harnesses.md)")  # fmt: skip
    if not Path(python).is_file():
        pytest.fail(f"MEDCAP_LMMS_EVAL_PYTHON={python}: no such file")
    return python


@pytest.fixture
def tiny_server(tmp_path, chatml_tokenizer_json):
    """``medcap serve`` on a tiny random model (as tests/serving's), in a thread of this process."""
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "serving"))
    from helpers import load_tiny_decoder, make_hf_llama, write_meta_checkpoint
    from serving_helpers import SPEC, N, serve_cfg

    from medcap.data.chatml import ChatMLTokenizer
    from medcap.models.checkpoints import save_vision_checkpoint
    from medcap.models.fusion import build_medcap_model
    from medcap.serving.server import BackgroundServer, load

    llm = write_meta_checkpoint(make_hf_llama(SPEC, seed=0, steerable=True), SPEC, tmp_path / "llm")
    torch.manual_seed(0)
    model = build_medcap_model(load_tiny_decoder(SPEC, llm, "meta", tmp_path / "x"), vision="vit_tiny", num_image_tokens=N,
                               image_token_id=ChatMLTokenizer(chatml_tokenizer_json).image_id)  # fmt: skip
    save_vision_checkpoint(model, tmp_path / "checkpoint" / "meta_model_0.pt", epoch=0)
    ws = {"root": tmp_path, "llm": llm, "tok": chatml_tokenizer_json, "images": tmp_path}
    with BackgroundServer(load(serve_cfg(ws, "max_new_tokens=32", "max_batch_size=8", "log_level=error"))) as server:
        yield server


@pytest.mark.slow
def test_lmms_eval_against_medcap_serve(slake, tmp_path, tiny_server):
    import openai

    from medcap.evaluation.protocols import PROTOCOLS

    python = _lmms_python()
    tasks = tmp_path / "lmms_tasks"
    written = slake_task.write_task(slake, tasks)
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused")
    model_id = client.models.list().data[0].id  # the served id, as the docs tell a user to read it
    out = tmp_path / "lmms_out"
    env = {**os.environ, "OPENAI_API_KEY": "unused", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    cmd = [python, "-m", "lmms_eval", "--model", "openai",
           "--model_args", f"model_version={model_id},base_url={tiny_server.url}/v1,timeout=120,num_concurrent=4",
           "--include_path", str(tasks), "--tasks", "medcap_slake", "--batch_size", "1",
           "--output_path", str(out), "--log_samples"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]

    (results_file,) = out.rglob("*_results.json")
    results = json.loads(results_file.read_text())["results"]["medcap_slake"]
    (samples_file,) = out.rglob("*_samples_medcap_slake.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == written["questions"]

    docs = [json.loads(line) for line in written["data"].read_text().splitlines()]  # lmms-eval's doc_id order
    rows = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        doc = docs[s["doc_id"]]
        assert s["target"] == doc["answer"]
        answer = s["filtered_resps"]
        answer = answer if isinstance(answer, str) else answer[0] if isinstance(answer[0], str) else answer[0][0]
        rows.append({"prediction": answer, "answer": doc["answer"], "answer_type": doc["answer_type"]})
        # the answer lmms-eval scored is the server's answer to that question and image
        png = io.BytesIO()
        slake_task_image(doc).save(png, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        text = doc["question"] + "\nAnswer the question using a single word or phrase."
        direct = client.chat.completions.create(model=model_id, max_tokens=32, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}])  # fmt: skip
        assert direct.choices[0].message.content == answer, doc["qid"]
    ours = PROTOCOLS["lmms_eval"].score(rows, "slake")
    assert results["slake_accuracy,none"] == pytest.approx(ours["overall"])
    assert results["slake_open_accuracy,none"] == pytest.approx(ours["open"])
    assert results["slake_closed_accuracy,none"] == pytest.approx(ours["closed"])


def slake_task_image(doc: dict):
    from PIL import Image

    return Image.open(doc["image_path"]).convert("RGB")
