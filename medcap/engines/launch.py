"""A local vLLM server for tests and benchmarks: vLLM's own OpenAI server, run by the python of
vLLM's venv (it pins its own torch, so it never shares medcap's), on a free loopback port, with
prompt embeddings enabled; stopped with its whole process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from medcap.errors import MedcapError

VLLM_PYTHON_ENV = "MEDCAP_VLLM_PYTHON"
REQUIRE_VLLM_ENV = "MEDCAP_REQUIRE_VLLM"  # =1 (make test-vllm, CI): a vllm test that skips fails instead


class VLLMStartError(MedcapError):
    """vLLM exited or did not answer while starting; the message ends with its log's tail."""


def find_vllm_python(repo: Path) -> Path | None:
    """``MEDCAP_VLLM_PYTHON`` (an error if it names no file), else ``REPO/.vllm-venv/bin/python``."""
    given = os.environ.get(VLLM_PYTHON_ENV)
    if given:
        if not Path(given).is_file():
            raise FileNotFoundError(f"{VLLM_PYTHON_ENV}={given}: no such file")
        return Path(given)
    venv = repo / ".vllm-venv" / "bin" / "python"
    return venv if venv.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``with VLLMServer(python, model_dir, log) as url: ...``"""

    def __init__(self, python: Path, model_dir: Path, log: Path, *, dtype: str = "float32", kv_cache_gib: int = 2,
                 start_timeout_s: float = 600.0, env: dict[str, str] | None = None, args: tuple[str, ...] = ()):  # fmt: skip
        self.python, self.model_dir, self.log = Path(python), Path(model_dir), Path(log)
        self.dtype, self.kv_cache_gib, self.start_timeout_s = dtype, kv_cache_gib, start_timeout_s
        self.env, self.args = env or {}, args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                "--enable-prompt-embeds", "--dtype", self.dtype, "--host", "127.0.0.1", "--port", str(self.port),
                *self.args]  # fmt: skip

    def __enter__(self) -> str:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib), "HF_HUB_OFFLINE": "1", **self.env}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                if self.proc.poll() is not None:
                    raise VLLMStartError(f"vLLM exited ({self.proc.returncode}) while starting: {self.tail()}")
                try:
                    if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                        return self.url
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise VLLMStartError(f"vLLM did not answer in {self.start_timeout_s:g} s: {self.tail()}")
                time.sleep(2)
        except BaseException:
            self.stop()
            raise

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text()[-chars:]
        except OSError:
            return f"(no log at {self.log})"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __exit__(self, *_: Any) -> None:
        self.stop()
