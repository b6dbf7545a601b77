"""LLM as judge of open answers: a large instruct LLM says RIGHT or WRONG for each row of an
evaluation CSV (``test_out_slake_{ckpt}.csv``), in-process (torchtune) or through any
OpenAI-compatible chat server.

Verdicts are parsed strictly: the reply's first word, stripped of punctuation and lowercased,
must be "right" or "wrong"; anything else is "unparsed" and counted apart. (The original checked
for the substring "right" first, so "WRONG, the right answer is..." scored as correct.)
"""

from __future__ import annotations

import json
import os
import re
import string
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medcap.data.sharegpt import ORIGINAL_PLACEHOLDER
from medcap.evaluation.outputs import judge_outputs
from medcap.evaluation.vqa import normalize_answer
from medcap.io import ResumableCSV, atomic_write, atomic_write_json, read_csv_rows

# The original's prompt, in its meaning: reply only RIGHT or WRONG; Question / Our answer /
# Correct answer. A --template file may replace it ({question}, {prediction}, {answer}).
DEFAULT_TEMPLATE = (
    "Respond with only RIGHT or WRONG: is our answer to the question correct?\n"
    "Question: {question}\nOur answer: {prediction}\nCorrect answer: {answer}"
)
OUT_COLUMNS = [
    "image",
    "instruction",
    "generated",
    "verdict",
    "answer_type",
    "index",
    "qid",
    "question",
    "prediction",
    "answer",
]
VERDICTS = ("right", "wrong", "unparsed", "exact", "too_long")


def parse_verdict(reply: str) -> str:
    words = reply.strip().split()
    first = words[0].strip(string.punctuation + "*_`\"'").lower() if words else ""
    return first if first in ("right", "wrong") else "unparsed"


@dataclass
class JudgeItem:
    index: int
    image: str
    question: str
    prediction: str
    answer: str
    answer_type: str
    qid: str

    def prompt(self, template: str) -> str:
        return template.format(question=self.question, prediction=self.prediction, answer=self.answer)


_USER_HEADER = re.compile(r"<\|start_header_id\|>\s*user\s*<\|end_header_id\|>")


def question_text(instruction: str) -> str:
    """The question of a CSV row. medcap's ``instruction`` is the question itself; the
    original's held the whole decoded prompt (header tokens as text, the image as a run of "①",
    in the two-turn protocol a description before it), whose last user turn is the question."""
    if not _USER_HEADER.search(instruction):
        return instruction
    last_turn = _USER_HEADER.split(instruction)[-1].split("<|eot_id|>")[0]
    return last_turn.replace(ORIGINAL_PLACEHOLDER, "").strip()


def read_items(csv_path: Path) -> list[JudgeItem]:
    """Rows of a medcap (or original) evaluation CSV: instruction = the question (or the
    original's whole prompt), output = the correct answer, generated = ours."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"--csv_path {csv_path} not found")
    rows = read_csv_rows(csv_path)
    missing = [c for c in ("instruction", "output", "generated") if rows and c not in rows[0]]
    if missing:
        raise ValueError(
            f"{csv_path}: missing column(s) {missing}; expected image, instruction, output, generated"
        )
    return [
        JudgeItem(int(r["index"]) if (r.get("index") or "").isdigit() else i, r.get("image", ""),
                  question_text(r["instruction"]),
                  r["generated"], r["output"], (r.get("answer_type") or "").strip().upper(), r.get("qid", ""))
        for i, r in enumerate(rows)
    ]  # fmt: skip


def summarize_verdicts(rows: Sequence[dict[str, str]]) -> dict[str, Any]:
    def cell(subset):
        counts = {v: sum(r["verdict"] == v for r in subset) for v in VERDICTS}
        judged = len(subset) - counts["too_long"]
        right = counts["right"] + counts["exact"]
        return {"n": len(subset), **counts, "accuracy": right / judged if judged else None}

    closed = [r for r in rows if r.get("answer_type") == "CLOSED"]
    open_ = [r for r in rows if r.get("answer_type") == "OPEN"]
    return {"all": cell(rows), "closed": cell(closed), "open": cell(open_),
            "note": "accuracy = (right + exact) / judged; unparsed replies count as not right"}  # fmt: skip


Backend = Callable[[list[str]], list[str]]  # prompts -> replies


def run_judge(
    csv_path: str | Path,
    backend: Backend,
    *,
    batch_size: int = 8,
    template: str = DEFAULT_TEMPLATE,
    skip_exact: bool = False,
    fits: Callable[[str], bool] = lambda _: True,
    write_files: bool = True,
    outputs: tuple[Path, Path, Path] | None = None,
) -> dict[str, Any]:
    """Judge every row not judged yet, appending to ``<csv>_70B_out.csv`` as it goes (or to
    ``outputs``: replies, accuracy, summary). ``write_files=False`` (tensor-parallel ranks but
    the first) judges in lockstep, writing nothing."""
    csv_path = Path(csv_path)
    out_path, acc_path, summary_path = outputs or judge_outputs(csv_path)
    items = read_items(csv_path)
    with ResumableCSV(out_path, OUT_COLUMNS, write=write_files) as out:
        todo = [it for it in items if it.index not in out.done]
        bar = tqdm(
            total=len(items), initial=len(items) - len(todo), desc="judging", unit="item", dynamic_ncols=True
        )

        def write(it: JudgeItem, prompt: str, reply: str, verdict: str) -> None:
            out.add({"image": it.image, "instruction": prompt, "generated": reply, "verdict": verdict,
                     "answer_type": it.answer_type, "index": it.index, "qid": it.qid, "question": it.question,
                     "prediction": it.prediction, "answer": it.answer})  # fmt: skip
            bar.update(1)

        queue = []
        for it in todo:
            prompt = it.prompt(template)
            if skip_exact and normalize_answer(it.prediction) == normalize_answer(it.answer):
                write(it, prompt, "", "exact")
            elif not fits(prompt):
                write(it, prompt, "", "too_long")
            else:
                queue.append((it, prompt))
        for start in range(0, len(queue), batch_size):
            chunk = queue[start : start + batch_size]
            for (it, prompt), reply in zip(chunk, backend([p for _, p in chunk])):
                write(it, prompt, reply, parse_verdict(reply))
        bar.close()
    done = out.done
    rows = [done[it.index] for it in items if it.index in done]
    summary = summarize_verdicts(rows)
    if not write_files:
        return summary
    accuracy = summary["all"]["accuracy"]
    atomic_write(acc_path, lambda fh: fh.write(f"{accuracy if accuracy is not None else 'nan'}\n".encode()))
    atomic_write_json(summary_path, summary, indent=2)
    return summary


# ---------------------------------------------------------------- OpenAI-compatible servers
class OpenAIBackend:
    """``POST {base_url}/chat/completions``, a bounded number of requests in flight, retries with
    exponential backoff on 429/5xx and network errors. The API key comes from an environment
    variable and is never printed."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", temperature: float = 0.0,
                 max_tokens: int = 16, concurrency: int = 8, timeout: float = 60.0, retries: int = 5,
                 backoff: float = 1.0):  # fmt: skip
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.concurrency, self.timeout, self.retries, self.backoff = concurrency, timeout, retries, backoff
        self._key = os.environ.get(api_key_env, "")

    def _post(self, prompt: str) -> str:
        body = json.dumps({
            "model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
            "messages": [{"role": "user", "content": prompt}],
        }).encode()  # fmt: skip
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500 or attempt == self.retries:
                    raise RuntimeError(f"{self.url}: HTTP {e.code} {e.reason}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.retries:
                    raise RuntimeError(f"{self.url}: {e}") from None
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def __call__(self, prompts: list[str]) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._post, prompts))


# ---------------------------------------------------------------- in-process torchtune model
class ModelBackend:
    """A model already in this process judges: batched KV-cache decoding with the evaluation's
    loop. The generate recipe's ``eval_vqa=True`` judges with the LLM it has loaded (the
    original's in-process judge); ``TorchtuneBackend`` loads a big one."""

    def __init__(self, model: Any, tokenizer: Any, *, max_seq_len: int | None = None, max_new_tokens: int = 16,
                 temperature: float = 0.0, top_k: int | None = None, rng: Any = None):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_len, self.max_new_tokens = max_seq_len, max_new_tokens
        self.temperature, self.top_k, self.rng = temperature, top_k, rng

    def encode(self, dialog: list[tuple[str, str]]) -> list[int]:
        """(role, text) turns, then the assistant header: the prompt the reply continues."""
        from torchtune.data import Message

        messages = [Message(role=r, content=t, masked=True) for r, t in dialog] + [
            Message(role="assistant", content="")
        ]
        tokens, _ = self.tokenizer.tokenize_messages(messages, add_end_tokens=False)
        return tokens

    def fits_dialog(self, dialog: list[tuple[str, str]]) -> bool:
        return self.max_seq_len is None or len(self.encode(dialog)) + self.max_new_tokens <= self.max_seq_len

    def fits(self, prompt: str) -> bool:
        return self.fits_dialog([("user", prompt)])

    def reply(self, dialogs: list[list[tuple[str, str]]]) -> list[str]:
        from medcap.decoding import Sampling, generate

        ids = generate(
            self.model, [self.encode(d) for d in dialogs], max_new_tokens=self.max_new_tokens,
            stop_tokens=self.tokenizer.stop_tokens, pad_id=self.tokenizer.pad_id,
            sampling=Sampling(temperature=self.temperature, top_k=self.top_k, rng=self.rng),
        )  # fmt: skip
        return [self.tokenizer.decode(x).strip() for x in ids]

    def __call__(self, prompts: list[str]) -> list[str]:
        return self.reply([[("user", p)] for p in prompts])


class TorchtuneBackend(ModelBackend):
    """A Llama 3 / 3.1 Instruct (Meta-format folder) loaded in this process. Under torchrun the
    model is tensor-parallel across the processes (torchtune's Llama plan): each rank takes only
    its slices of the memory-mapped checkpoint."""

    def __init__(self, ckpt_dir: str, tokenizer_path: str, *, max_seq_len: int = 200, max_new_tokens: int = 16,
                 temperature: float = 0.0, top_k: int | None = None, device: str | None = None, seed: int = 0,
                 quantize: str | None = None, dtype: str | None = None):  # fmt: skip
        import torch
        from torchtune.models.llama3 import llama3_tokenizer

        from medcap.distributed import setup_device
        from medcap.models.judge_llm import load_meta_llama, load_tensor_parallel, quantize_nf4_

        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = setup_device(device, distributed=self.world_size > 1)
        tokenizer = llama3_tokenizer(tokenizer_path)
        if quantize not in (None, "nf4"):
            raise ValueError(f"--quantize {quantize}: only nf4 is supported")
        if quantize and self.world_size > 1:
            raise ValueError(
                "--quantize nf4 is for one GPU; several processes use tensor parallelism instead"
            )
        # the checkpoint's dtype (bf16) on a GPU and fp32 on a CPU, unless dtype= says otherwise
        weights = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype] if dtype else None
        if self.world_size > 1:
            model = load_tensor_parallel(ckpt_dir, max_seq_len, self.device, self.world_size, weights)
        else:
            model = load_meta_llama(ckpt_dir, max_seq_len=max_seq_len)
            if weights is not None or self.device.type == "cpu":
                model.to(weights or torch.float32)
            if quantize == "nf4":
                self.quantized = quantize_nf4_(model, self.device)
            model.to(self.device)
        super().__init__(
            model.eval(), tokenizer, max_seq_len=max_seq_len, max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, rng=torch.Generator(device=self.device).manual_seed(seed),
        )  # fmt: skip

    def close(self) -> None:
        """Under torchrun every rank must call this once judging is done (see end_distributed)."""
        if self.world_size > 1:
            from medcap.distributed import end_distributed

            end_distributed()


def chat(
    backend: TorchtuneBackend, read: Callable[[str], str] = input, write: Callable[[str], None] = print
) -> None:
    """An interactive chat with the judge model; ``q`` ends it."""
    dialog: list[tuple[str, str]] = []
    while True:
        try:
            text = read("> ")
        except EOFError:
            return
        if text.strip() == "q":
            return
        dialog.append(("user", text))
        if not backend.fits_dialog(dialog):
            write("(the conversation no longer fits --max_seq_len: starting over)")
            dialog = [("user", text)]
        answer = backend.reply([dialog])[0]
        dialog.append(("assistant", answer))
        write(answer)
