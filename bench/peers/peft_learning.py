"""The library side of the learning comparison (BENCHMARKS.md, issues 10 and 11): each
fixture's adapter config (`tests/fixtures/peft-methods/<method>/adapter` with PEFT: the
causal methods on the Alpaca rows, `seq-cls` on the classification sentences; and
`tests/fixtures/bottleneck-houlsby/adapter` with AdapterHub's `adapters` library) trained
afresh with the fixture's recipe: `reference.json`'s steps, batch and learning rate; AdamW
with torch's defaults; the chat template, user = instruction [+ "\n\n" + input], loss on
the answer + "<|im_end|>\n" only, right padding; each epoch a `random.Random(seed)` shuffle
of the rows, batches of 4 taken in turn; `torch.manual_seed(seed)` before the model is
built. At the fixture's own seed (offset 0) this reproduces `reference.json`'s losses
(printed beside them, `fixture_losses`) until float order makes them drift.

With `--dump DIR`, each run also writes what graft needs to repeat it like for like
(`graft-bench methods --parts learning --peft-start DIR`): `DIR/<method>-<seed>/`
`start.safetensors`, the trainable parameters as the library initialised them, under
graft's names (`Trainable::names`), in graft's shapes, with q/k output rows and prefix keys
in the GGUF order graft keeps them in; and `order.json`, every step's batch (row indices)
and the run's losses.

Not for CI (torch, transformers and PEFT: target/peers/venv from ../shared/peers/setup.sh;
for `bottleneck-houlsby` a venv with `adapters`, as bench/peers/adapterhub_load.py says):

    target/peers/venv/bin/python bench/peers/peft_learning.py [--methods a,b] [--seeds 0,100] [--dump DIR]

One JSON line per (method, seed offset): per-step losses and the mean of the last 10.
"""
import argparse
import json
import os
import random
import time

import torch
from safetensors.torch import save_file

torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
HF_DIR = os.environ.get("HF_DIR", os.path.join(ROOT, "target", "peers", "smollm2-hf"))
METHODS = ["prompt-tuning", "p-tuning-mlp", "prefix-tuning", "p-tuning-v2", "ia3", "dora"]
# AdapterHub's fixture: run with a venv holding the `adapters` library (it pins transformers
# 4.57), e.g. target/peers/venv-adapters (bench/peers/adapterhub_load.py says how).
HOULSBY = "bottleneck-houlsby"
# The classification fixture: LoRA on q/v plus a `score` head (`LlamaForSequenceClassification`)
# on `classification-sentences.jsonl` minus its last 6 rows, cross-entropy over the labels.
SEQ_CLS = "seq-cls"


def fixture_dir(method):
    return os.path.join(FIX, HOULSBY) if method == HOULSBY else os.path.join(FIX, "peft-methods", method)


def build(method, seed):
    """The base with the method's fresh trainable parameters, drawn after `torch.manual_seed`."""
    adapter_dir = os.path.join(fixture_dir(method), "adapter")
    if method == HOULSBY:
        import adapters
        from adapters import AdapterConfig

        cfg = AutoConfig.from_pretrained(HF_DIR)
        # The directory is written by transformers 5 (rope_parameters); 4.57 reads rope_theta.
        rope = json.load(open(os.path.join(HF_DIR, "config.json"))).get("rope_parameters") or {}
        if "rope_theta" in rope:
            cfg.rope_theta = rope["rope_theta"]
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(HF_DIR, config=cfg, dtype=torch.float32)
        adapters.init(model)
        saved = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
        model.add_adapter(saved["name"], config=AdapterConfig.load(saved["config"]))
        model.train_adapter(saved["name"])
        return model
    from peft import PeftConfig, get_peft_model

    cfg = PeftConfig.from_pretrained(adapter_dir)
    cfg.inference_mode = False
    torch.manual_seed(seed)
    if method == SEQ_CLS:
        from transformers import AutoModelForSequenceClassification

        labels = json.load(open(os.path.join(fixture_dir(method), "reference.json")))["labels"]
        model = AutoModelForSequenceClassification.from_pretrained(
            HF_DIR, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={x: i for i, x in enumerate(labels)}, dtype=torch.float32)
        model.config.pad_token_id = AutoTokenizer.from_pretrained(HF_DIR).pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
    return get_peft_model(model, cfg)


def examples(method, tok):
    """(input ids, targets) per training row: the answer's tokens for the causal methods,
    the label's index for the classifier."""
    if method == SEQ_CLS:
        labels = json.load(open(os.path.join(fixture_dir(method), "reference.json")))["labels"]
        rows = [json.loads(x) for x in open(os.path.join(FIX, "classification-sentences.jsonl"))][:-6]
        return [(tok(r["text"], add_special_tokens=False)["input_ids"], labels.index(r["label"])) for r in rows]
    data = json.load(open(os.path.join(FIX, "peft-lora-smollm2", "train_dataset_alpaca.json")))
    return [encode(tok, ex) for ex in data]


def user_text(ex):
    return ex["instruction"] + (("\n\n" + ex["input"]) if ex.get("input") else "")


def encode(tok, ex):
    msgs = [{"role": "user", "content": user_text(ex)}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(ex["output"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    return p_ids + a_ids, [-100] * len(p_ids) + a_ids


def gguf_rows(t, heads):
    """llama.cpp's q/k permutation (convert_hf_to_gguf), on a tensor's first axis."""
    shape = t.shape
    return t.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def prefix_keys(t, axis, cfg):
    """A prefix axis (layers x (keys, values) x kv_dim) with every key head's dimensions in
    GGUF order (graft trains prefix keys in its model's layout; values as they are)."""
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    x = t.movedim(axis, 0)
    rest = x.shape[1:]
    x = x.reshape(cfg.num_hidden_layers, 2, kv, *rest).clone()
    for layer in range(cfg.num_hidden_layers):
        x[layer, 0] = gguf_rows(x[layer, 0], cfg.num_key_value_heads)
    return x.reshape(-1, *rest).movedim(0, axis)


def graft_names(model):
    """The trainable parameters under graft's names and in its layout."""
    peft = getattr(model, "peft_config", {}).get("default")
    cfg = model.get_base_model().config if peft else model.config
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    prefix = peft is not None and peft.peft_type == "PREFIX_TUNING"
    projection = prefix and peft.prefix_projection
    bottleneck = {"attention_adapters": "Attention", "output_adapters": "Ffn"}
    bn_names = {"adapter_down.0.weight": "down", "adapter_down.0.bias": "down_bias",
                "adapter_up.weight": "up", "adapter_up.bias": "up_bias"}
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        t = p.detach().clone().float()
        parts = n.split(".")
        if "modules_to_save" in parts and parts[parts.index("modules_to_save") - 1] == "score":
            out["score.weight"] = t  # the classification head, (labels, hidden) as graft's
            continue
        if n.startswith("prompt_encoder."):
            rest = ".".join(parts[2:])  # after prompt_encoder.default
            if rest == "embedding.weight":
                out["embedding"] = prefix_keys(t, 1, cfg) if prefix and not projection else t
                continue
            i, what = int(parts[3]), parts[4]  # mlp_head.0.weight / transform.2.bias
            name = f"mlp.{i // 2}.{what}"
            if projection and i == 2:  # the projection's output: the prefix
                t = prefix_keys(t, 0, cfg)
            out[name] = t.reshape(1, -1) if what == "bias" else t
            continue
        li = int(parts[parts.index("layers") + 1])
        if parts[parts.index("layers") + 2] in bottleneck:
            site = bottleneck[parts[parts.index("layers") + 2]]
            out[f"{li}.{site}.{bn_names['.'.join(parts[parts.index('layers') + 5:])]}"] = t
            continue
        mod = parts[parts.index("layers") + 3]
        if "ia3_l" in parts:
            t = t.reshape(-1)
            if mod in heads:  # scales q/k outputs: their rows
                t = gguf_rows(t, heads[mod])
            out[f"{li}.{mod}.ia3_l"] = t
        elif "lora_A" in parts:
            out[f"{li}.{mod}.a"] = t
        elif "lora_B" in parts:
            out[f"{li}.{mod}.b"] = gguf_rows(t, heads[mod]) if mod in heads else t
        elif "lora_magnitude_vector" in parts:
            out[f"{li}.{mod}.magnitude"] = gguf_rows(t, heads[mod]) if mod in heads else t
        else:
            raise SystemExit(f"no graft name for {n}")
    return {k: v.contiguous() for k, v in out.items()}


def train(method, seed, tok, dump=None, perturb=0.0):
    ref = json.load(open(os.path.join(fixture_dir(method), "reference.json")))
    t = ref["training"]
    steps, B, lr = t["steps"], t["batch"], t["lr"]
    model = build(method, seed)
    rnd = random.Random(seed)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    enc = examples(method, tok)
    if dump:
        os.makedirs(dump, exist_ok=True)
        save_file(graft_names(model), os.path.join(dump, "start.safetensors"))
    if perturb:
        # How far the run itself carries a change in the last digits of its start.
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(1 + perturb * torch.randn(p.shape, generator=g))
    order, losses, batches, t0 = [], [], [], time.perf_counter()
    for _ in range(steps):
        if len(order) < B:
            idx = list(range(len(enc)))
            rnd.shuffle(idx)
            order += idx
        bidx, order = order[:B], order[B:]
        batches.append(bidx)
        L = max(len(enc[i][0]) for i in bidx)
        ids = torch.full((B, L), tok.pad_token_id or 2, dtype=torch.long)
        lab = torch.full((B, L), -100, dtype=torch.long)
        att = torch.zeros((B, L), dtype=torch.long)
        for r, i in enumerate(bidx):
            x, y = enc[i]
            ids[r, : len(x)] = torch.tensor(x)
            att[r, : len(x)] = 1
            if method != SEQ_CLS:
                lab[r, : len(y)] = torch.tensor(y)
        if method == SEQ_CLS:
            lab = torch.tensor([enc[i][1] for i in bidx])
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    last10 = sum(losses[-10:]) / len(losses[-10:])
    if dump:
        json.dump({"batches": batches, "losses": losses}, open(os.path.join(dump, "order.json"), "w"))
    return {"method": method, "seed": seed, "lr": lr, "steps": steps, "losses": losses,
            "last10": round(last10, 4), "fixture_losses": [round(x, 4) for x in t["losses"]],
            "seconds": round(time.perf_counter() - t0, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,100,200,300", help="offsets added to each fixture's seed")
    ap.add_argument("--dump", help="write each run's starting parameters and batches here")
    ap.add_argument("--perturb", type=float, default=0.0,
                    help="scale every starting parameter by 1 + PERTURB x N(0, 1) (the dumped start is the unperturbed one)")
    a = ap.parse_args()
    try:
        tok = AutoTokenizer.from_pretrained(HF_DIR)
    except ValueError:
        # transformers 4.57 (the adapters library's) does not read the tokenizer_config.json
        # transformers 5 wrote: the same tokenizer.json and chat template, loaded by hand.
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(HF_DIR, "tokenizer.json"))
        tok.chat_template = open(os.path.join(HF_DIR, "chat_template.jinja")).read()
    for m in a.methods.split(","):
        base = json.load(open(os.path.join(fixture_dir(m), "reference.json")))["training"]["seed"]
        for off in [int(s) for s in a.seeds.split(",")]:
            dump = a.dump and os.path.join(a.dump, f"{m}-{base + off}")
            r = train(m, base + off, tok, dump, a.perturb)
            r["seed_offset"] = off
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
