"""End to end: ``medcap serve`` as its own process judged by chat_llama3.py, and the page in
a real headless chromium."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serving_helpers import KEY, ROOT, SPEC, ct_small, serve_cfg

from medcap.serving.server import BackgroundServer, load


# ---------------------------------------------------------------- the CLI, with chat_llama3.py as a client
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_overrides(ws) -> list[str]:
    return [
        *SPEC.overrides(), "device=cpu", "dtype=fp32", "temperature=0", "top_k=null", "max_new_tokens=8",
        "tokenizer._component_=medcap.data.chatml.chatml_tokenizer", f"tokenizer.path={ws['tok']}",
        f"checkpointer.checkpoint_dir={ws['llm']}", f"output_dir={ws['root'] / 'out'}", "vision=vit_tiny",
        f"vision_checkpoint={ws['root'] / 'checkpoint' / 'meta_model_0.pt'}",
    ]  # fmt: skip


def write_eval_csv(path: Path) -> Path:
    """A small evaluation CSV as the generate recipe writes it (the judge's input)."""
    rows = [("Is this a CT?", "Yes", "Yes", "CLOSED"), ("Which organ?", "Lung", "the left lung", "OPEN"),
            ("Is it normal?", "No", "Normal", "CLOSED"), ("What modality?", "MRI", "CT", "OPEN")]  # fmt: skip
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "instruction", "output", "generated", "index", "answer_type", "content_type", "qid"])
        for i, (q, gold, pred, kind) in enumerate(rows):
            w.writerow([f"img{i}.jpg", q, gold, pred, i, kind, "", 100 + i])
    return path


def test_cli_serve_judged_by_chat_llama3(ws, tmp_path, monkeypatch):
    """``python -m medcap.cli serve`` in its own process; chat_llama3.py's OpenAI backend judges a
    CSV against it (the server as a judge: text-only requests to the LLM alone)."""
    sys.path.insert(0, str(ROOT))
    import chat_llama3

    port = free_port()
    env = {**os.environ, "MEDCAP_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medcap.cli", "serve", "--config", "custom_generation_config", *cli_overrides(ws),
         f"port={port}", "max_batch_size=4"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)
        name = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        csv_path = write_eval_csv(tmp_path / "test_out_slake_meta_model_0.csv")
        chat_llama3.main(["--backend", "openai", "--base_url", url + "/v1", "--model", name, "--exp", "eval_vqa",
                          "--csv_path", str(csv_path), "--max_gen_len", "6", "--retries", "1"])  # fmt: skip
        rows = list(csv.DictReader(open(tmp_path / "test_out_slake_meta_model_0_70B_out.csv", encoding="utf-8-sig")))
        assert len(rows) == 4 and all(r["verdict"] in ("right", "wrong", "unparsed") for r in rows)
        assert all(r["instruction"].startswith("Respond with only RIGHT or WRONG") for r in rows)
        summary = json.loads((tmp_path / "test_out_slake_meta_model_0_70B_summary.json").read_text())["all"]
        assert summary["n"] == 4
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "Uvicorn running" in out or "serving medcap-llm" in out, out[-2000:]
    assert KEY not in out  # the key never reaches the log


# ---------------------------------------------------------------- the page, in a real browser
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make chromium)")
def test_page_in_headless_chromium(ws, tmp_path, monkeypatch):
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("MEDCAP_API_KEY", KEY)
    with BackgroundServer(load(serve_cfg(ws, "max_new_tokens=12", "log_level=error"))) as s, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.on("pageerror", lambda e: pytest.fail(f"page error: {e}"))
        page.goto(s.url + "/")
        assert "API key" in page.inner_text("#model")
        page.fill("#key", KEY)
        page.press("#key", "Tab")  # change event: the page asks /v1/models with the key
        page.wait_for_selector("#model strong")
        assert "medcap-llm-meta_model_0" in page.inner_text("#model")

        def ask(question: str, answers: int) -> str:
            page.fill("#question", question)
            page.click("#ask")
            done = page.wait_for_selector(f"#conversation li.assistant[data-done='true'] >> nth={answers - 1}",
                                          timeout=60_000)  # fmt: skip
            return done.inner_text()

        page.set_input_files("#file", str(ws["images"] / "scan0.png"))
        page.wait_for_selector("#preview:not([hidden])")
        first = ask("What modality is this image?", 1)
        assert "medcap-llm-meta_model_0" in first and "meta_model_0.pt" in first
        assert page.inner_text("#conversation li.assistant .text >> nth=0").strip()  # the answer appeared
        ask("Is it normal?", 2)  # a follow-up about the same image
        assert page.locator("#conversation li.user").count() == 2
        shot = tmp_path / "serve_page_png.png"
        page.screenshot(path=str(shot), full_page=True)

        dicom = ct_small()
        page.set_input_files("#file", str(dicom))  # a DICOM: shown windowed, as the model reads it
        # the PNG's preview stays shown until the page has read the new file, so wait for the
        # caption that names the DICOM rather than for a visible preview
        page.wait_for_function("name => document.getElementById('preview-caption').textContent.endsWith(name)",
                               arg=dicom.name)  # fmt: skip
        assert page.is_visible("#preview")
        assert "128\u00d7128 pixels" in page.inner_text("#preview-caption")
        assert page.locator("#conversation li").count() == 0  # a new image starts a new conversation
        ask("Which organ is shown?", 1)
        assert page.inner_text("#conversation li.assistant .text >> nth=0").strip()
        dicom_shot = tmp_path / "serve_page_dicom.png"
        page.screenshot(path=str(dicom_shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000 and dicom_shot.stat().st_size > 10_000
    print(f"screenshots: {shot} {dicom_shot}")
