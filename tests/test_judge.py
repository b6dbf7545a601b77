"""chat_llama3.py: strict verdicts, the OpenAI-compatible backend against a local server (with an
injected 500), the in-process torchtune backend on a tiny Meta checkpoint, resume, chat."""

from __future__ import annotations

import csv
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from helpers import TinyLlama, make_hf_llama, write_meta_checkpoint

from medcap.evaluation import judge
from medcap.evaluation.judge import parse_verdict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import chat_llama3  # noqa: E402


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("RIGHT", "right"), ("Right.", "right"), ("WRONG", "wrong"), ("wrong - the right answer is lung", "wrong"),
        ("", "unparsed"), ("RIGHT/WRONG", "unparsed"), ("The answer is right", "unparsed"), ("**Right**", "right"),
        ("Wrong, right answer: liver", "wrong"),
    ],
)  # fmt: skip
def test_verdicts_are_read_from_the_first_word(reply, verdict):
    assert parse_verdict(reply) == verdict


def write_eval_csv(path: Path) -> Path:
    rows = [
        ("Is this a CT?", "Yes", "Yes", "CLOSED"),
        ("Which organ?", "Lung", "the left lung", "OPEN"),
        ("Is it normal?", "No", "Normal", "CLOSED"),
        ("What modality?", "MRI", "CT", "OPEN"),
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["image", "instruction", "output", "generated", "index", "answer_type", "content_type", "qid"]
        )
        for i, (q, gold, pred, kind) in enumerate(rows):
            w.writerow([f"img{i}.jpg", q, gold, pred, i, kind, "", 100 + i])
    return path


class ChatServer:
    """A chat-completions server on loopback; the first request gets a 500."""

    def __init__(self, replies: dict[str, str]):
        self.requests, self.auth, self.failed_once = [], [], False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.auth.append(self.headers.get("Authorization"))
                if not server.failed_once:
                    server.failed_once = True
                    self.send_response(500)
                    self.end_headers()
                    return
                prompt = body["messages"][0]["content"]
                server.requests.append(prompt)
                reply = next((r for key, r in replies.items() if key in prompt), "I cannot say.")
                data = json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": reply}}]}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = ChatServer(
        {
            "Which organ?": "RIGHT",
            "Is it normal?": "WRONG - the right answer is no",
            "What modality?": "wrong",
        }
    )
    yield s
    s.close()


def run_openai(server, csv_path, *extra):
    chat_llama3.main([
        "--backend", "openai", "--base_url", server.url, "--model", "judge", "--exp", "eval_vqa",
        "--csv_path", str(csv_path), "--retries", "3", "--timeout", "10", *extra,
    ])  # fmt: skip


def test_openai_backend_retries_and_writes_outputs(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    monkeypatch.setattr(judge.time, "sleep", lambda s: None)
    csv_path = write_eval_csv(tmp_path / "test_out_slake_meta_model_3.csv")
    run_openai(server, csv_path, "--skip_exact")
    printed = capsys.readouterr().out
    assert "sk-secret-value" not in printed and all(a == "Bearer sk-secret-value" for a in server.auth)
    assert (
        server.failed_once and len(server.requests) == 3
    )  # the exact match was not sent; the 500 was retried
    out = list(csv.DictReader(open(tmp_path / "test_out_slake_meta_model_3_70B_out.csv", encoding="utf-8-sig")))
    assert [r["verdict"] for r in out] == ["exact", "right", "wrong", "wrong"]
    assert (
        out[1]["instruction"].startswith("Respond with only RIGHT or WRONG")
        and "Our answer: the left lung" in out[1]["instruction"]
    )
    summary = json.loads((tmp_path / "test_out_slake_meta_model_3_70B_summary.json").read_text())
    assert (
        summary["all"]["accuracy"] == 0.5
        and summary["closed"]["n"] == 2
        and summary["open"]["accuracy"] == 0.5
    )
    assert float((tmp_path / "test_out_slake_meta_model_3_70B_acc.csv").read_text()) == 0.5


def test_resume_judges_only_what_is_missing(server, tmp_path, monkeypatch):
    monkeypatch.setattr(judge.time, "sleep", lambda s: None)
    csv_path = write_eval_csv(tmp_path / "t.csv")
    run_openai(server, csv_path)
    out_path = tmp_path / "t_70B_out.csv"
    full = out_path.read_text()
    assert len(server.requests) == 4
    rows = list(csv.DictReader(open(out_path, newline="", encoding="utf-8-sig")))
    with open(out_path, "w", newline="", encoding="utf-8-sig") as f:  # the run died after two rows
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:2])
    run_openai(server, csv_path)
    assert len(server.requests) == 6  # only rows 3 and 4 were asked again
    assert out_path.read_text() == full


def test_torchtune_backend_on_a_tiny_meta_checkpoint(tmp_path, llama3_tokenizer_path, capsys):
    spec = TinyLlama(vocab_size=128256, layers=2, dim=64, ffn=128, heads=4, kv_heads=2, max_seq_len=512)
    ckpt = write_meta_checkpoint(make_hf_llama(spec, seed=0), spec, tmp_path / "llama")
    csv_path = write_eval_csv(tmp_path / "eval.csv")
    args = ["--ckpt_dir", str(ckpt), "--tokenizer_path", str(llama3_tokenizer_path), "--temperature", "0",
            "--max_seq_len", "200", "--max_batch_size", "8", "--exp", "eval_vqa", "--csv_path", str(csv_path), "--device", "cpu"]  # fmt: skip
    chat_llama3.main(args)
    out_path = tmp_path / "eval_70B_out.csv"
    first = out_path.read_text()
    rows = list(csv.DictReader(open(out_path, encoding="utf-8-sig")))
    assert len(rows) == 4 and all(r["verdict"] in ("right", "wrong", "unparsed") for r in rows)
    summary = json.loads((tmp_path / "eval_70B_summary.json").read_text())["all"]
    assert summary["right"] + summary["wrong"] + summary["unparsed"] == 4
    out_path.unlink()
    chat_llama3.main([*args, "--max_batch_size", "1"])
    assert out_path.read_text() == first  # greedy: batch size does not change the replies
    tight = write_eval_csv(tmp_path / "tight.csv")
    chat_llama3.main([*args, "--max_seq_len", "20", "--csv_path", str(tight)])  # later flags win
    assert json.loads((tmp_path / "tight_70B_summary.json").read_text())["all"]["too_long"] == 4


def split_meta(single: Path, out: Path, n: int) -> Path:
    """Meta's model-parallel layout: each sharded weight cut along its split dimension."""
    from medcap.models.judge_llm import _shard_dim

    state = torch.load(single / "consolidated.00.pth", weights_only=True)
    out.mkdir()
    for rank in range(n):
        shard = {
            k: v if _shard_dim(k) is None else v.chunk(n, dim=_shard_dim(k))[rank].clone()
            for k, v in state.items()
        }
        torch.save(shard, out / f"consolidated.{rank:02d}.pth")
    (out / "params.json").write_text((single / "params.json").read_text())
    return out


@pytest.mark.parametrize("files", [1, 2])
def test_torchrun_two_processes_tensor_parallel_gives_identical_files(tmp_path, llama3_tokenizer_path, files):
    """Two tensor-parallel processes (gloo) reply as one process does, from one consolidated file
    or from two model-parallel shards (each rank slicing, nothing merged whole)."""
    import shutil
    import subprocess

    spec = TinyLlama(vocab_size=128256, layers=2, dim=64, ffn=128, heads=4, kv_heads=2, max_seq_len=512)
    ckpt = write_meta_checkpoint(make_hf_llama(spec, seed=0), spec, tmp_path / "llama")
    if files == 2:
        ckpt = split_meta(ckpt, tmp_path / "llama2", 2)
    one = write_eval_csv(tmp_path / "one.csv")
    two = tmp_path / "two.csv"
    shutil.copyfile(one, two)
    common = ["--ckpt_dir", str(ckpt), "--tokenizer_path", str(llama3_tokenizer_path), "--temperature", "0",
              "--max_seq_len", "200", "--max_batch_size", "8", "--exp", "eval_vqa", "--device", "cpu"]  # fmt: skip
    chat_llama3.main([*common, "--csv_path", str(one)])
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "chat_llama3.py"), *common, "--csv_path", str(two)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = list(csv.DictReader(open(tmp_path / "one_70B_out.csv", encoding="utf-8-sig")))
    parallel = list(csv.DictReader(open(tmp_path / "two_70B_out.csv", encoding="utf-8-sig")))
    assert [r["generated"] for r in parallel] == [r["generated"] for r in single]
    assert (tmp_path / "two_70B_acc.csv").read_text() == (tmp_path / "one_70B_acc.csv").read_text()
    assert any(r["generated"] for r in single)  # the replies are not trivially empty


def test_meta_shards_merge(tmp_path):
    """Meta ships 70B as 8 model-parallel shards: split a tiny checkpoint in two and reload."""
    from medcap.models.judge_llm import META_SHARD_DIMS, load_meta_llama

    spec = TinyLlama(vocab_size=512, layers=2, dim=64, ffn=128, heads=4, kv_heads=2, max_seq_len=128)
    single = write_meta_checkpoint(make_hf_llama(spec, seed=2), spec, tmp_path / "one")
    state = torch.load(single / "consolidated.00.pth", weights_only=True)
    assert META_SHARD_DIMS
    two = split_meta(single, tmp_path / "two", 2)
    tokens = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert torch.equal(load_meta_llama(single)(tokens), load_meta_llama(two)(tokens))

    from medcap.models.judge_llm import ShardPieces, merge_meta_shards

    shards = [torch.load(two / f"consolidated.0{r}.pth", weights_only=True) for r in range(2)]
    pieces = merge_meta_shards(shards)["layers.0.attention.wo.weight"]  # split along dim 1
    assert isinstance(pieces, ShardPieces) and pieces.shape == state["layers.0.attention.wo.weight"].shape
    full = state["layers.0.attention.wo.weight"]
    assert torch.equal(pieces.slice(1, 16, 48), full[:, 16:48])  # across the two files
    assert torch.equal(pieces.slice(0, 8, 24), full[8:24])


def test_chat_ends_on_q():
    class Echo:
        def fits_dialog(self, dialog):
            return True

        def reply(self, dialogs):
            return [f"turns={len(dialogs[0])}"]

    inputs = iter(["hello", "again", "q", "never read"])
    said = []
    judge.chat(Echo(), read=lambda _: next(inputs), write=said.append)
    assert said == ["turns=1", "turns=3"]


def test_nf4_quantized_judge(tmp_path, llama3_tokenizer_path):
    """--quantize nf4: decoder-layer weights become 4-bit NF4 tensors; logits stay close."""
    from torchao.dtypes.nf4tensor import NF4Tensor

    spec = TinyLlama(vocab_size=128256, layers=2, dim=128, ffn=256, heads=4, kv_heads=2, max_seq_len=512)
    ckpt = write_meta_checkpoint(make_hf_llama(spec, seed=0), spec, tmp_path / "llama")
    full = judge.TorchtuneBackend(str(ckpt), str(llama3_tokenizer_path), device="cpu")
    quant = judge.TorchtuneBackend(str(ckpt), str(llama3_tokenizer_path), device="cpu", quantize="nf4")
    assert quant.quantized == 2 * 5  # q, o, w1, w2, w3 per layer (k and v are too small for NF4 blocks)
    assert isinstance(quant.model.layers[0].mlp.w1.weight, NF4Tensor)
    tokens = torch.randint(0, 128256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = full.model(tokens).flatten(), quant.model(tokens).flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.95
    assert not torch.equal(a, b)
    csv_path = write_eval_csv(tmp_path / "q.csv")
    chat_llama3.main(["--ckpt_dir", str(ckpt), "--tokenizer_path", str(llama3_tokenizer_path), "--device", "cpu",
                      "--quantize", "nf4", "--exp", "eval_vqa", "--csv_path", str(csv_path)])  # fmt: skip
    assert len(list(csv.DictReader(open(tmp_path / "q_70B_out.csv", encoding="utf-8-sig")))) == 4


@pytest.mark.parametrize("scaled_rope", [False, True])
def test_judge_reads_hf_folders_like_meta_ones(tmp_path, scaled_rope):
    """The same weights as an HF safetensors folder and as a Meta folder load to the same model,
    and that model matches transformers (Llama 3.1's scaled RoPE included)."""
    from medcap.models.judge_llm import load_meta_llama

    spec = TinyLlama(vocab_size=512, layers=2, dim=64, ffn=128, heads=4, kv_heads=2, max_seq_len=256)
    hf = make_hf_llama(spec, seed=4)
    if scaled_rope:
        from transformers import LlamaForCausalLM

        cfg = spec.hf_config()
        cfg.rope_parameters = {"rope_type": "llama3", "rope_theta": spec.rope_base, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
        torch.manual_seed(4)
        hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    decoder = load_meta_llama(tmp_path / "hf", max_seq_len=256).eval()
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (decoder(tokens) - hf(tokens).logits).abs().max() < 1e-4
    if not scaled_rope:
        meta = load_meta_llama(write_meta_checkpoint(hf, spec, tmp_path / "meta"), max_seq_len=256).eval()
        with torch.no_grad():
            assert torch.equal(meta(tokens), decoder(tokens))


def test_judge_in_bf16_on_cpu(tmp_path, llama3_tokenizer_path):
    """--dtype bf16: the judge's weights in bf16 on a CPU too (the GPU's precision)."""
    spec = TinyLlama(vocab_size=128256, layers=2, dim=64, ffn=128, heads=4, kv_heads=2, max_seq_len=512)
    ckpt = write_meta_checkpoint(make_hf_llama(spec, seed=0), spec, tmp_path / "llama")
    backend = judge.TorchtuneBackend(str(ckpt), str(llama3_tokenizer_path), device="cpu", dtype="bf16")
    assert {p.dtype for p in backend.model.parameters()} == {torch.bfloat16}
    replies = backend(["Respond with only RIGHT or WRONG.", "Is this right?"])
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
