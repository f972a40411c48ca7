"""Runs inside the llama.cpp environment (llama-cpp-python; no moe_merge there): load a GGUF file, optionally
with a LoRA adapter, and generate greedily from token ids.

    python llama_generate.py REQUEST.json RESULT.json

REQUEST: {"model": GGUF, "lora": GGUF or null, "prompts": [[ids]], "texts": [str], "max_new_tokens": N,
"eos_token_id": ID}. RESULT: the GGUF metadata, llama.cpp's own tokenization of each text, and per prompt the new
tokens and the logits that chose them.
"""

import json
import sys

import llama_cpp
import numpy as np
from llama_cpp import Llama


def main(request_path: str, result_path: str) -> None:
    request = json.loads(open(request_path).read())
    # the KV cache in float32 too (llama.cpp's default is f16): the comparison is float32 against float32
    llm = Llama(
        model_path=request["model"],
        lora_path=request.get("lora"),
        n_ctx=64,
        n_batch=64,
        n_threads=2,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        logits_all=True,
        verbose=False,
    )
    generations = []
    for ids in request["prompts"]:
        llm.reset()
        llm.eval(ids)
        tokens, logits = [], []
        for _ in range(request["max_new_tokens"]):
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)  # the last position's logits
            token = int(row.argmax())
            tokens.append(token)
            logits.append(row.tolist())
            if token == request["eos_token_id"]:
                break
            llm.eval([token])
        generations.append({"tokens": tokens, "logits": logits})
    result = {
        "llama_cpp_python": llama_cpp.__version__,
        "metadata": llm.metadata,
        "tokenized": [llm.tokenize(t.encode(), add_bos=True, special=False) for t in request.get("texts", [])],
        "generations": generations,
    }
    open(result_path, "w").write(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
