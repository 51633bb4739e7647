"""Loads a model directory graft wrote (a full fine-tuning job's result, downloaded with
`graft adapters export NAME DIR`) with transformers' own classes, as any user of the
ecosystem would, and prints its greedy answer to a chat message, to compare with what
graft serves for the same name (`graft chat --adapter NAME -t 0`).

Not for CI (it needs torch and transformers):

    python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch transformers safetensors
    /tmp/hfvenv/bin/python bench/peers/hf_model_load.py DIR "What is the capital of France?" [N]

Prints one JSON line: the prompt's token ids (through the directory's chat template and
tokenizer), the N greedy token ids and their text. Greedy decoding runs a full forward per
token (no KV cache), so the tokens are the model's argmax at each step and nothing else.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(2)
path, question = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 16
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
model.eval()
prompt = tok.apply_chat_template(
    [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
)
ids = tok(prompt, add_special_tokens=False)["input_ids"]
out = []
with torch.no_grad():
    cur = list(ids)
    for _ in range(n):
        logits = model(torch.tensor([cur])).logits[0, -1]
        t = int(torch.argmax(logits))
        if t == tok.eos_token_id:
            break
        out.append(t)
        cur.append(t)
print(json.dumps({"prompt_ids": ids, "tokens": out, "text": tok.decode(out)}))
