"""Loads bottleneck adapters in AdapterHub's own library and prints their greedy answers to
the Houlsby fixture's two prompts, to compare with what graft serves for the same adapter.

Not for CI. Needs the HF copy of the model (`../shared/peers/setup.sh venv hf` writes
`target/peers/smollm2-hf`) and a venv with the library (it pins its own transformers):

    python3 -m venv target/peers/venv-adapters
    target/peers/venv-adapters/bin/pip install torch adapters safetensors
    target/peers/venv-adapters/bin/python bench/peers/adapterhub_load.py DIR...

DIR is an adapter directory (`adapter_config.json` + `adapter.safetensors`), e.g.
`tests/fixtures/bottleneck-houlsby/adapter` or one `graft adapters export` wrote.
Greedy decoding runs a full forward per token, as the fixtures' references were made
(the library's `generate()` with its KV cache gives other tokens under transformers 4.57).
"""
import json
import os
import sys

import adapters
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
hf = os.environ.get("HF_MODEL", os.path.join(root, "target/peers/smollm2-hf"))
torch.set_num_threads(2)
tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(hf, "tokenizer.json"))
ref = json.load(open(os.path.join(root, "tests/fixtures/bottleneck-houlsby/reference.json")))
cfg = AutoConfig.from_pretrained(hf)
# The directory is written by transformers 5 (rope_parameters); 4.57 reads rope_theta.
rope = json.load(open(os.path.join(hf, "config.json"))).get("rope_parameters") or {}
if "rope_theta" in rope:
    cfg.rope_theta = rope["rope_theta"]
for d in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(hf, config=cfg, dtype=torch.float32)
    adapters.init(model)
    name = model.load_adapter(d, use_safetensors=True)
    model.set_active_adapters(name)
    model.eval()
    for p in ref["prompts"]:
        out = torch.tensor([p["token_ids"]])
        n = out.shape[1]
        with torch.no_grad():
            for _ in range(16):
                out = torch.cat([out, model(out).logits[0, -1].argmax().view(1, 1)], 1)
        text = tok.decode(out[0, n:], skip_special_tokens=False)
        print(f"{d} | {p['messages'][0]['content']} | {text!r}")
