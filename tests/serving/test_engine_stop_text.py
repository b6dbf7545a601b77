"""``Engine._take_token``: text held back while a stop string might be starting is delivered when
a stop token ends the answer instead (it was dropped: the streamed and whole answers lost their
tail whenever the request named ``stop`` strings)."""

from __future__ import annotations

from types import SimpleNamespace

from medcap.serving.engine import Engine, Job
from medcap.serving.metrics import Metrics

STOP_TOKEN = 0


def engine() -> Engine:
    e = Engine.__new__(Engine)  # the token handling alone: no model, no batch
    e.tokenizer = SimpleNamespace(decode=lambda ids: "".join(chr(i) for i in ids))
    e.stop_tokens, e.metrics, e.running = {STOP_TOKEN}, Metrics(), []
    return e


def run(tokens: list[int], stop: list[str], max_tokens: int = 50):
    events = []
    request = SimpleNamespace(prompt=[1, 2], stop=stop, max_tokens=max_tokens)
    job = Job(request, events.append, timeout_s=60)
    e = engine()
    for tok in tokens:
        e._take_token(job, tok)
    text = "".join(ev.text for ev in events if ev.kind == "delta")
    done = [ev for ev in events if ev.kind == "done"]
    return text, done[0].finish_reason if done else None


def test_held_back_text_is_delivered_at_a_stop_token():
    tokens = [*map(ord, "yes, it is"), STOP_TOKEN]
    assert run(tokens, stop=[]) == ("yes, it is", "stop")
    assert run(tokens, stop=["<end of answer>"]) == ("yes, it is", "stop")  # held: 14 characters
    assert run(tokens, stop=["is it"]) == ("yes, it is", "stop")  # "is" might have begun "is it"
    assert run(tokens, stop=[", it"]) == ("yes", "stop")  # the stop string itself still cuts
    assert run([*map(ord, "yes, it is")], stop=["<end>"], max_tokens=10) == ("yes, it is", "length")
