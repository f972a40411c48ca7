"""Runs inside the transformers 4.x environment (no moe_merge there): load a checkpoint as a 4.x user does, with
no remote code, and generate greedily from token ids.

    python tf4_generate.py REQUEST.json RESULT.json

REQUEST: {"model": DIR, "prompts": [[ids]], "max_new_tokens": N, "eos_token_id": ID, "state_dict": PATH}.
RESULT: the class and version that loaded it, its loading info, the config fields 4.x read, and per prompt the
new tokens and the logits that chose them; the state dict goes to PATH (safetensors) for the caller to compare.
"""

import json
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def main(request_path: str, result_path: str) -> None:
    request = json.loads(open(request_path).read())
    model, info = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.float32, output_loading_info=True)
    model.eval()
    generations = []
    with torch.no_grad():
        for ids in request["prompts"]:
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=request["max_new_tokens"],
                do_sample=False,
                eos_token_id=request["eos_token_id"],
                pad_token_id=request["eos_token_id"],
                output_logits=True,
                return_dict_in_generate=True,
            )
            generations.append(
                {"tokens": out.sequences[0, len(ids) :].tolist(), "logits": torch.cat(out.logits).tolist()}
            )
    # tied tensors share storage, which save_file refuses: each is written as its own copy
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, request["state_dict"])
    result = {
        "transformers": transformers.__version__,
        "class": type(model).__name__,
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
        "rope_theta": getattr(model.config, "rope_theta", None),
        "tie_word_embeddings": model.config.tie_word_embeddings,
        "generations": generations,
    }
    open(result_path, "w").write(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
