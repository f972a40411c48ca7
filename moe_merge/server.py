"""`moe-merge serve`: transformers' OpenAI-compatible server (`transformers serve`) for one model, each request
checked before it reaches the model.

`transformers serve OUT --trust-remote-code` serves a dynamic output as it is. What it lacks is a check of the
request: an empty prompt, a prompt longer than the model or a batch holds, or sampling parameters outside the
OpenAI ranges reach generation, and with continuous batching an error there fails every request in flight. This
command is the same server with one middleware that answers such a request with HTTP 400 in the OpenAI error format
(`param` names the field), and with continuous batching's batch size fixed up front, so that the prompt limit is
known before a request is queued.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
# (field, lowest, highest, whether the lowest is allowed): OpenAI's ranges
RANGES = [
    ("temperature", 0.0, 2.0, True),
    ("top_p", 0.0, 1.0, False),
    ("frequency_penalty", -2.0, 2.0, True),
    ("presence_penalty", -2.0, 2.0, True),
]


def request_problem(path: str, body: dict, tokenizer, max_prompt_tokens: int) -> tuple[str, str] | None:
    """(field, message) for a request the model must not run, else None. `max_prompt_tokens`: the longest prompt
    it takes, new tokens included."""
    if not isinstance(body, dict):
        return "body", "the request body must be a JSON object"
    for field, low, high, low_ok in RANGES:
        value = body.get(field)
        if value is None:
            continue
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not (low <= value <= high)
            or (value == low and not low_ok)
        ):
            bound = "[" if low_ok else "("
            return field, f"`{field}` is {value!r}; it must be a number in {bound}{low}, {high}]"
    new = body.get("max_tokens", body.get("max_completion_tokens"))
    field = "max_tokens" if "max_tokens" in body else "max_completion_tokens"
    if new is not None and (not isinstance(new, int) or isinstance(new, bool) or new < 1):
        return field, f"`{field}` is {new!r}; it must be a whole number of tokens, at least 1"
    if body.get("n", 1) != 1:
        return "n", f"`n` is {body.get('n')!r}; this server returns one choice per request (n = 1)"
    if path.endswith("/chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages", "`messages` must be a non-empty list of chat messages"
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # the template names what it cannot read
            return "messages", f"the chat template cannot read `messages`: {e}"
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
        field = "messages"
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return "prompt", "`prompt` must be a non-empty string"
        ids = tokenizer(prompt)["input_ids"]
        field = "prompt"
    if not ids:
        return field, f"`{field}` has no tokens"
    if len(ids) + (new or 1) > max_prompt_tokens:
        return field, (
            f"`{field}` has {len(ids)} tokens and asks for {new or 1} more; this model takes at most "
            f"{max_prompt_tokens} in all: shorten it or ask for fewer tokens"
        )
    return None


def serve(
    model_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    continuous_batching: bool = False,
    max_batch_tokens: int = 2048,
    num_blocks: int = 64,
    non_blocking: bool = False,
    **serve_options,
):
    """Run transformers' server on `model_dir` with request checks; `non_blocking` returns the running server
    (transformers' `Serve`, whose `kill_server()` stops it), else blocks until it stops. With continuous batching
    the paged KV cache holds `num_blocks` blocks of 256 tokens: sized by default from free device memory, which on a
    CPU is most of the machine's RAM."""
    from fastapi.responses import JSONResponse
    from transformers import AutoConfig, AutoTokenizer
    from transformers.cli import serve as transformers_serve
    from transformers.cli.serving import server as transformers_server

    import moe_merge.modeling  # noqa: F401  registers the model for the server

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = AutoConfig.from_pretrained(model_dir).get_text_config()
    longest = getattr(text, "max_position_embeddings", None) or 1 << 30
    if continuous_batching:
        longest = min(longest, max_batch_tokens)

    async def check(request, call_next):
        if request.method == "POST" and request.url.path in ENDPOINTS:
            try:
                body = json.loads(await request.body() or b"null")
            except ValueError:
                body = None
            problem = request_problem(request.url.path, body, tokenizer, longest)
            if problem is not None:
                field, message = problem
                log.info("refused a request: %s", message)
                return JSONResponse(
                    {"error": {"message": message, "type": "invalid_request_error", "param": field, "code": None}},
                    status_code=400,
                )
        return await call_next(request)

    build = transformers_server.build_server

    def build_checked(*args, **kwargs):
        app = build(*args, **kwargs)
        app.middleware("http")(check)
        return app

    transformers_server.build_server = build_checked
    try:
        return transformers_serve.Serve(
            force_model=str(model_dir),
            host=host,
            port=port,  # the model class is ours, imported: no remote code
            continuous_batching=continuous_batching,
            cb_max_batch_tokens=max_batch_tokens if continuous_batching else None,
            cb_num_blocks=num_blocks if continuous_batching else None,
            non_blocking=non_blocking,
            **serve_options,
        )
    finally:
        transformers_server.build_server = build
