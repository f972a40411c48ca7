"""Serving a dynamic model as LLMs are served, tested with the official `openai` client on loopback: transformers'
own server (`transformers serve OUT --trust-remote-code`) answers as `generate` does, and `moe-merge serve
--continuous-batching` batches concurrent requests, each routed on its own prompt, refuses bad requests with HTTP 400,
and frees what a disconnected client held.

The model is the real zoo's smear at FFN level over its four LoRA adapters (SmolLM2-135M-Instruct, bf16): each task
is answered only when its own expert is merged, so an answer shows the request's own routing.
"""

from __future__ import annotations

import gc
import socket
import subprocess
import sys
import time
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_merge import realzoo
from moe_merge.tokens import load_tokenizer
from tests.test_real import assembled

pytestmark = pytest.mark.slow

TASKS = ["flags", "diets", "zorb", "blick"]
NEW_TOKENS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: int, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"no server on port {port} after {seconds} s")


@pytest.fixture(scope="module")
def model_dir(real_zoo, tmp_path_factory) -> Path:
    yield from (
        built["smear-ffn"]
        for built in assembled(
            real_zoo, {"smear-ffn": ("lora", {"method": "smear", "level": "ffn"})}, tmp_path_factory.mktemp("serve")
        )
    )


def _answers(model_dir: Path, dtype: torch.dtype):
    """The same model in this process: what `generate` answers, greedily."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tok = load_tokenizer(model_dir)

    def answer(prompt: str | None = None, messages: list | None = None) -> str:
        if messages is not None:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
                "input_ids"
            ]
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    return answer


@pytest.fixture(scope="module")
def reference(model_dir):
    """As stored (bf16), as `transformers serve` loads it."""
    return _answers(model_dir, torch.bfloat16)


@pytest.fixture(scope="module")
def reference32(model_dir):
    """In float32, as the batching server below runs it: packed (paged) attention and the dense path round bf16
    differently, which flips a greedy near-tie now and then (a chat-wrapped prompt the experts never saw, say), for
    any model transformers batches; float32 makes the comparison of the routing exact."""
    return _answers(model_dir, torch.float32)


def _rows(per_task: int) -> list[dict]:
    return [r for i in range(per_task) for t in TASKS for r in realzoo.eval_rows([t])[i : i + 1]]  # tasks interleaved


def _client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def transformers_server(model_dir):
    """`transformers serve OUT --trust-remote-code`, as a user runs it."""
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "transformers.cli.transformers",
            "serve",
            str(model_dir),
            "--trust-remote-code",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_healthy(port)
        yield _client(port), str(model_dir)
    finally:
        server.terminate()
        server.wait(30)


@pytest.fixture(scope="module")
def batching_server(model_dir):
    """`moe-merge serve OUT --continuous-batching`, in this process so that its batches can be looked into."""
    from moe_merge.server import serve

    port = _free_port()
    server = serve(
        model_dir,
        port=port,
        continuous_batching=True,
        max_batch_tokens=512,
        num_blocks=16,
        non_blocking=True,
        dtype="float32",
    )
    try:
        _wait_healthy(port)
        yield _client(port), str(model_dir), server
    finally:
        server.kill_server()


def test_the_output_carries_the_base_chat_template(model_dir, real_zoo):
    assert (model_dir / "chat_template.jinja").read_text() == (real_zoo / "base" / "chat_template.jinja").read_text()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completions_and_chat_answer_as_generate(transformers_server, reference, stream):
    client, model = transformers_server
    for row in _rows(1):
        out = client.completions.create(
            model=model, prompt=row["prompt"], max_tokens=NEW_TOKENS, temperature=0, stream=stream
        )
        text = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
        assert text == reference(row["prompt"]), row
        assert text.strip() == row["completion"].strip()  # the task's own expert answered
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(
        model=model, messages=messages, max_tokens=NEW_TOKENS, temperature=0, stream=stream
    )
    text = "".join(c.choices[0].delta.content or "" for c in out) if stream else out.choices[0].message.content
    assert text == reference(messages=messages)


def test_concurrent_clients_each_get_their_own_merge(batching_server, reference32):
    client, model, _ = batching_server
    rows = _rows(1)
    with ThreadPoolExecutor(len(rows)) as pool:
        texts = list(
            pool.map(
                lambda r: (
                    client.completions.create(model=model, prompt=r["prompt"], max_tokens=NEW_TOKENS, temperature=0)
                    .choices[0]
                    .text
                ),
                rows,
            )
        )
    assert texts == [reference32(r["prompt"]) for r in rows]
    assert [t.strip() for t in texts] == [r["completion"].strip() for r in rows]


def test_64_requests_of_mixed_tasks_at_concurrency_16_all_complete_correctly(batching_server, reference32):
    client, model, _ = batching_server
    rows = _rows(16)
    assert len(rows) == 64

    def ask(row, i):
        if i % 2:  # half as chat, streamed
            out = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": row["prompt"]}],
                max_tokens=NEW_TOKENS,
                temperature=0,
                stream=True,
            )
            return "".join(c.choices[0].delta.content or "" for c in out)
        return (
            client.completions.create(model=model, prompt=row["prompt"], max_tokens=NEW_TOKENS, temperature=0)
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(ask, rows, range(len(rows))))
    want = [
        reference32(messages=[{"role": "user", "content": r["prompt"]}]) if i % 2 else reference32(r["prompt"])
        for i, r in enumerate(rows)
    ]
    assert texts == want


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "word " * 600}, "prompt"),  # longer than a batch holds (512 tokens)
        ({"prompt": "Hi", "temperature": -0.5}, "temperature"),
        ({"prompt": "Hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
    ],
    ids=["empty", "over-long", "temperature", "top_p", "max_tokens", "no-messages"],
)
def test_a_bad_request_gets_a_400_naming_the_field_and_the_server_goes_on(
    batching_server, reference32, request_, field
):
    client, model, _ = batching_server
    call = client.chat.completions.create if "messages" in request_ else client.completions.create
    with pytest.raises(openai.BadRequestError) as refused:
        call(model=model, **{"max_tokens": 4, **request_})
    assert refused.value.status_code == 400 and refused.value.body["param"] == field
    assert f"`{field}`" in refused.value.message
    row = _rows(1)[0]
    ok = client.completions.create(model=model, prompt=row["prompt"], max_tokens=NEW_TOKENS, temperature=0)
    assert ok.choices[0].text == reference32(row["prompt"])


def test_a_client_that_disconnects_mid_stream_frees_its_slot_blocks_and_weights(batching_server, monkeypatch):
    from moe_merge import serving

    client, model, server = batching_server
    kept = []
    real_keep = serving.Packing.keep
    monkeypatch.setattr(
        serving.Packing, "keep", lambda self, w: kept.extend(weakref.ref(s) for s in self.states) or real_keep(self, w)
    )
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=400,
        temperature=0,
        stream=True,
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    manager = server._generation_state._cb_manager
    processor = manager._cb.batch_processor
    deadline = time.time() + 60
    while processor.scheduler.active_requests and time.time() < deadline:
        time.sleep(0.2)
    assert not processor.scheduler.active_requests, "the request still holds its slot"
    assert processor.cache.compute_free_capacity() == pytest.approx(1.0), "KV blocks are still held"
    gc.collect()
    assert kept and all(ref() is None or not hasattr(ref(), serving.WEIGHTS) for ref in kept), "merge weights remain"
    assert not any(hasattr(state, serving.WEIGHTS) for state in processor.scheduler.waiting_requests.values())
