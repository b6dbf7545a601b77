"""``engine=vllm`` against a real vLLM (the registry's CPU build, ``make test-vllm``) serving the
demo's SmolLM2 from prompt embeddings, in fp32: greedy answers equal medcap's own engine token for
token (the oracle), the generate recipe writes the same answers and metrics, and ``medcap serve``
streams the same text. Skipped, with the reason, only when there is no vLLM: no ``.vllm-venv``,
no ``MEDCAP_VLLM_PYTHON`` (and no ``MEDCAP_VLLM_URL``, a server already running); with
``MEDCAP_REQUIRE_VLLM=1`` (``make test-vllm``, hence CI) that is a failure, as is any skip of a test
marked ``vllm`` (``tests/conftest.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medcap.engines.launch import REQUIRE_VLLM_ENV, VLLMServer, VLLMStartError, find_vllm_python
from medcap.evaluation.tasks import tasks_from_settings

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="session")
def vllm_url(request, tmp_path_factory):
    """vLLM serving the converted SmolLM2 (fp32, prompt embeddings) on a free port, once; or the
    one at ``MEDCAP_VLLM_URL`` (serving the same folder, started as ``make vllm`` does). Without
    either, the skip comes before anything is converted."""
    if os.environ.get("MEDCAP_VLLM_URL"):
        yield os.environ["MEDCAP_VLLM_URL"]
        return
    python = find_vllm_python(ROOT)
    if python is None:
        why = "no vLLM: `make test-vllm` installs it in .vllm-venv (or set MEDCAP_VLLM_PYTHON)"
        if os.environ.get(REQUIRE_VLLM_ENV) == "1":
            pytest.fail(f"{REQUIRE_VLLM_ENV}=1 but {why}")
        pytest.skip(why)
    smollm2 = request.getfixturevalue("smollm2")
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    try:
        with VLLMServer(python, smollm2, log) as url:
            yield url
    except VLLMStartError as e:
        pytest.fail(str(e))


def demo_cfg(smollm2: Path, slake: Path, out: Path, *extra: str):
    base = OmegaConf.load(ROOT / "recipes" / "configs" / "smollm2" / "135M_demo_generation.yaml")
    overrides = [f"checkpointer.checkpoint_dir={smollm2}", f"tokenizer.path={smollm2 / 'tokenizer.json'}",
                 f"output_dir={out}", "vision_pretrained=False", "dtype=fp32", "test_slake=True",
                 f"dataset_source={slake}", *extra]  # fmt: skip
    return OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))


def recipe(cfg):
    from medcap.cli import load_recipe
    from medcap.settings import GenerateSettings

    return load_recipe("generate").EvaluationRecipe(GenerateSettings.from_config(cfg, "generate"))


def test_greedy_tokens_equal_medcaps_engine(vllm_url, smollm2, demo_slake, tmp_path):
    """The oracle: the demo's test questions (random vision encoder, so image tokens steer the
    answers), the same prompt embeddings decoded by medcap's KV-cache engine and by vLLM."""
    from medcap.decoding import generate
    from medcap.engines import VLLMClient
    from medcap.engines.remote import RemoteGenerator

    slake, _ = demo_slake
    # medcap's own engine needs the whole LLM (engine=vllm loads only the embedding table)
    r = recipe(demo_cfg(smollm2, slake, tmp_path, "limit=32"))
    answerer = r.load(None)
    items = tasks_from_settings(r.settings)[0].items
    ours, theirs = [], []
    remote = RemoteGenerator(VLLMClient(vllm_url), workers=8)
    remote.client.connect(hidden_size=answerer.model.llm_dim, vocab_size=answerer.model.tok_embeddings.num_embeddings)
    tok = answerer.tokenizer
    for start in range(0, len(items), 8):
        chunk = items[start : start + 8]
        prompts = [answerer.prompt(it.messages) for it in chunk]
        images = answerer.images(chunk)
        kwargs = dict(max_new_tokens=24, stop_tokens=tok.stop_tokens, pad_id=tok.pad_id)
        ours += generate(answerer.model, prompts, images, **kwargs)
        theirs += remote.generate(answerer.model, prompts, images, **kwargs)
    same = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y))
    total = sum(max(len(x), len(y)) for x, y in zip(ours, theirs))
    print(f"vLLM vs medcap, greedy fp32: {same}/{total} tokens agree, "
          f"{sum(x == y for x, y in zip(ours, theirs))}/{len(ours)} answers identical")  # fmt: skip
    assert len(ours) == 32 and total > 32
    assert len({tuple(x) for x in ours}) > 1  # the images steer: not one answer for all
    assert theirs == ours


def test_generate_recipe_writes_the_same_answers_and_metrics(vllm_url, smollm2, demo_slake, tmp_path):
    slake, _ = demo_slake
    common = ("limit=12", "answer_types=[CLOSED,OPEN]")
    ours = recipe(demo_cfg(smollm2, slake, tmp_path / "medcap", *common)).run()
    theirs = recipe(demo_cfg(smollm2, slake, tmp_path / "vllm", *common, "engine=vllm", f"vllm_url={vllm_url}")).run()
    strip = lambda d: {k: v for k, v in d.items() if k != "seconds"}  # noqa: E731
    assert {t: strip(s) for t, s in theirs["untrained"].items()} == {t: strip(s) for t, s in ours["untrained"].items()}
    a = (tmp_path / "medcap" / "test_out_slake_untrained.csv").read_text()
    b = (tmp_path / "vllm" / "test_out_slake_untrained.csv").read_text()
    assert a == b and a.count("\n") > 12


def test_two_turns_through_vllm(vllm_url, smollm2, demo_slake, tmp_path):
    """describe_then_answer: the second prompt (first prompt, description, question) sent whole;
    equal to medcap's engine recomputing the second turn (two_turn_cache=False)."""
    slake, _ = demo_slake
    common = ("limit=4", "vqa_mode=describe_then_answer", "max_new_tokens=16")
    recipe(demo_cfg(smollm2, slake, tmp_path / "medcap", *common, "two_turn_cache=False")).run()
    recipe(demo_cfg(smollm2, slake, tmp_path / "vllm", *common, "engine=vllm", f"vllm_url={vllm_url}")).run()
    a = (tmp_path / "medcap" / "test_out_slake_untrained.csv").read_text()
    assert a == (tmp_path / "vllm" / "test_out_slake_untrained.csv").read_text()


def test_serve_streams_through_vllm(vllm_url, smollm2, tmp_path):
    """``medcap serve engine=vllm``: the same API; streamed text equals the whole answer and the
    answer of medcap's own engine; a prompt over vLLM's context is a 400."""
    import openai

    from medcap.serving.server import BackgroundServer, load

    def served(*extra):
        cfg = demo_cfg(smollm2, tmp_path, tmp_path / "out", "test_slake=False", "dataset_source=null",
                       "max_new_tokens=20", *extra)  # fmt: skip
        return BackgroundServer(load(cfg))

    messages = [{"role": "user", "content": "Name three organs of the chest."}]
    answers = {}
    for engine, extra in (("medcap", ()), ("vllm", ("engine=vllm", f"vllm_url={vllm_url}"))):
        with served(*extra) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
            whole = client.chat.completions.create(model=server.served.info.name, messages=messages, max_tokens=20)
            streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=server.served.info.name, messages=messages, max_tokens=20, stream=True) if c.choices)  # fmt: skip
            assert streamed == whole.choices[0].message.content
            answers[engine] = (whole.choices[0].message.content, whole.usage.completion_tokens)
    assert answers["vllm"] == answers["medcap"] and answers["vllm"][1] > 0
