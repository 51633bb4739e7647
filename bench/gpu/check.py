#!/usr/bin/env python3
"""graft on a GPU beside PyTorch on the same random weights (issue 15).

Runs where the GPU is (one H200: PyTorch and CUDA 13, no Rust, no network), from the kit
`make gpu-kit` prepares here: graft-gpu-check built with `--features cuda` (xz), the
SmolLM2-135M config and tokenizer files, and this script. It

1. writes a SmolLM2-135M-shaped model with random weights (bf16-representable values, so
   graft's bf16 copy holds exactly them) as an HF directory graft loads, and a random PEFT
   LoRA (rank 8, all seven modules);
2. runs graft-gpu-check on the device: the serving path's logits and 32 greedy tokens per
   prompt, base and with the LoRA; batch invariance (alone vs in a batch of 32); the
   server started in-process until SERVING plus one gRPC generation; and the figures
   (decode at 1, 32 and 256 streams, prefill of 512, 32 distinct LoRAs vs bare, LoRA SFT);
3. runs the same model in PyTorch: an fp32 reference (TF32 off) for the logits and greedy
   tokens, PyTorch's own bf16 run of them (on a GPU: graft may deviate from fp32 by 1.5x
   what bf16 arithmetic costs PyTorch, or the stated tolerance), and the bf16 model for the
   same figures (a KV cache, per-row LoRAs as batched matmuls, LoRA SFT with AdamW);
4. writes `result.json` and prints a summary with the ratios.

`--device cpu --quick` is the dry run on a machine without a GPU (a CPU build of
graft-gpu-check, PyTorch on the CPU): the same script end to end.

On the GPU machine (the device tool; `make gpu-kit` first, carrying target/gpu-kit):
    python3 bench/gpu/check.py --kit target/gpu-kit --report "$OUT"
"""

import argparse
import ctypes
import json
import lzma
import math
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- files graft reads
def save_safetensors(path, tensors):
    """f32 tensors as a safetensors file (no numpy or safetensors package needed)."""
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().to(torch.float32).contiguous().cpu()
        n = t.numel() * 4
        blobs.append(ctypes.string_at(t.data_ptr(), n))
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def bf16_exact(t):
    return t.to(torch.bfloat16).to(torch.float32)


def random_model(cfg, seed):
    """HF-named weights: linears N(0, 0.02), the (tied) embeddings N(0, 0.1) so that the
    logits spread enough for greedy decoding to be stable, norms 1 + N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    H, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * hd
    w = {"model.embed_tokens.weight": torch.randn(V, H, generator=g) * 0.1}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, shape in [
            ("self_attn.q_proj", (H, H)),
            ("self_attn.k_proj", (kv, H)),
            ("self_attn.v_proj", (kv, H)),
            ("self_attn.o_proj", (H, H)),
            ("mlp.gate_proj", (F, H)),
            ("mlp.up_proj", (F, H)),
            ("mlp.down_proj", (H, F)),
        ]:
            w[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.02
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w[p + norm + ".weight"] = 1 + torch.randn(H, generator=g) * 0.1
    w["model.norm.weight"] = 1 + torch.randn(H, generator=g) * 0.1
    return {k: bf16_exact(v) for k, v in w.items()}


MODULES = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}


def random_lora(W, cfg, rank, seed, spread=0.05):
    """PEFT LoRA tensors {(layer, module): (A (r, in), B (out, r))}, B non-zero."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(cfg["num_hidden_layers"]):
        for m, part in MODULES.items():
            o, n = W[f"model.layers.{i}.{part}.{m}.weight"].shape
            a = (torch.rand(rank, n, generator=g) - 0.5) * spread
            b = (torch.rand(o, rank, generator=g) - 0.5) * spread
            out[(i, m)] = (a, b)
    return out


def write_lora(d, lora, rank, alpha):
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": list(MODULES), "lora_dropout": 0.0, "bias": "none",
        "base_model_name_or_path": "random-smollm2-135m", "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False,
    }))
    t = {}
    for (i, m), (a, b) in lora.items():
        p = f"base_model.model.model.layers.{i}.{MODULES[m]}.{m}"
        t[p + ".lora_A.weight"] = a
        t[p + ".lora_B.weight"] = b
    save_safetensors(d / "adapter_model.safetensors", t)


# ---------------------------------------------------------------- the PyTorch model
class Llama:
    """HF Llama's arithmetic (halves RoPE, GQA, SwiGLU, RMSNorm in f32, tied head), with an
    optional per-row LoRA: `loras` a list of per-layer {module: (A, B)} and `rows` the index
    of each batch row's adapter."""

    def __init__(self, W, cfg, device, dtype):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.W = {k: v.to(device=device, dtype=dtype) for k, v in W.items()}
        hd = cfg["head_dim"]
        inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        pos = torch.arange(cfg["max_position_embeddings"], dtype=torch.float64)
        f = torch.outer(pos, inv)
        emb = torch.cat([f, f], dim=-1)
        self.cos = emb.cos().to(device=device, dtype=torch.float32)
        self.sin = emb.sin().to(device=device, dtype=torch.float32)

    def norm(self, x, w):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.cfg["rms_norm_eps"])
        return (x32 * w.float()).to(self.dtype)

    def rope(self, x, start):
        t = x.shape[2]
        cos, sin = self.cos[start:start + t], self.sin[start:start + t]
        x32 = x.float()
        h = x32.shape[-1] // 2
        rot = torch.cat([-x32[..., h:], x32[..., :h]], dim=-1)
        return (x32 * cos + rot * sin).to(self.dtype)

    def lin(self, x, layer, m, lora):
        y = x @ self.W[f"model.layers.{layer}.{MODULES[m]}.{m}.weight"].T
        if lora is not None:
            A, B, scale = lora  # A (R, r, in) per row, B (R, out, r)
            y = y + scale * torch.bmm(torch.bmm(x, A[layer][m].transpose(1, 2)), B[layer][m].transpose(1, 2))
        return y

    def forward(self, ids, cache=None, start=0, lora=None):
        """ids (B, T). `cache`: per layer [k, v] preallocated (B, kv, maxT, hd), filled at
        start..start+T. Returns logits (B, T, V) in f32."""
        c = self.cfg
        B, T = ids.shape
        nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        x = self.W["model.embed_tokens.weight"][ids]
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = self.norm(x, self.W[p + "input_layernorm.weight"])
            q = self.lin(h, i, "q_proj", lora).view(B, T, nh, hd).transpose(1, 2)
            k = self.lin(h, i, "k_proj", lora).view(B, T, nkv, hd).transpose(1, 2)
            v = self.lin(h, i, "v_proj", lora).view(B, T, nkv, hd).transpose(1, 2)
            q, k = self.rope(q, start), self.rope(k, start)
            if cache is not None:
                cache[i][0][:, :, start:start + T] = k
                cache[i][1][:, :, start:start + T] = v
                k, v = cache[i][0][:, :, :start + T], cache[i][1][:, :, :start + T]
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=(start == 0 and T > 1))
            a = a.transpose(1, 2).reshape(B, T, nh * hd)
            x = x + self.lin(a, i, "o_proj", lora)
            h = self.norm(x, self.W[p + "post_attention_layernorm.weight"])
            f = torch.nn.functional.silu(self.lin(h, i, "gate_proj", lora)) * self.lin(h, i, "up_proj", lora)
            x = x + self.lin(f, i, "down_proj", lora)
        x = self.norm(x, self.W["model.norm.weight"])
        return (x @ self.W["model.embed_tokens.weight"].T).float()

    def new_cache(self, B, T):
        c = self.cfg
        shape = (B, c["num_key_value_heads"], T, c["head_dim"])
        return [[torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(2)]
                for _ in range(c["num_hidden_layers"])]


def stack_loras(loras, rows, device, dtype, scale):
    """Per-row LoRA tensors: row j uses loras[rows[j]]."""
    L = len(loras[0])
    A = [{m: torch.stack([loras[r][l][m][0] for r in rows]).to(device, dtype) for m in MODULES} for l in range(L)]
    Bm = [{m: torch.stack([loras[r][l][m][1] for r in rows]).to(device, dtype) for m in MODULES} for l in range(L)]
    return (A, Bm, scale)


def per_layer(lora, layers):
    return [{m: lora[(l, m)] for m in MODULES} for l in range(layers)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- PyTorch: reference and figures
@torch.no_grad()
def reference(model, prompts, lora, steps):
    """Logits at the last prompt position and `steps` greedy tokens, a full forward each step."""
    out = []
    for i, p in enumerate(prompts):
        for name, lr in [("base", None), ("lora", lora)]:
            if name == "lora" and lr is None:
                continue
            ids = list(p)
            first, greedy, margins = None, [], []
            for _ in range(steps):
                t = torch.tensor([ids], device=model.device)
                logits = model.forward(t, lora=lr)[0, -1]
                top = torch.topk(logits, 2)
                if first is None:
                    first = logits.cpu()
                greedy.append(int(top.indices[0]))
                margins.append(float(top.values[0] - top.values[1]))
                ids.append(greedy[-1])
            out.append({"prompt": i, "adapter": name, "logits": first, "greedy": greedy, "margins": margins})
    return out


@torch.no_grad()
def decode_rate(model, n, steps, lora=None):
    dev = model.device
    prompt = torch.tensor([[200 + ((i * 37 + j * 11) % 5000) for j in range(16)] for i in range(n)], device=dev)
    cache = model.new_cache(n, 16 + steps + 1)
    logits = model.forward(prompt, cache, 0, lora)
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    sync(dev)
    t = time.perf_counter()
    for s in range(steps):
        logits = model.forward(nxt, cache, 16 + s, lora)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
    sync(dev)
    return n * steps / (time.perf_counter() - t)


@torch.no_grad()
def prefill_rate(model, n):
    ids = torch.tensor([[100 + (j * 29) % 30000 for j in range(n)]], device=model.device)
    model.forward(ids)
    sync(model.device)
    t = time.perf_counter()
    model.forward(ids)
    sync(model.device)
    return n / (time.perf_counter() - t)


def train_rate(model, cfg, steps):
    """LoRA r=8 on the seven modules, alpha 16, batch 4 x 128, AdamW (lr 1e-4) over f32
    parameters, the base frozen in the model's dtype; tokens/s after the first step."""
    dev, layers = model.device, cfg["num_hidden_layers"]
    g = torch.Generator().manual_seed(1)
    params = []
    per = []
    for l in range(layers):
        d = {}
        for m in MODULES:
            o, n = model.W[f"model.layers.{l}.{MODULES[m]}.{m}.weight"].shape
            a = ((torch.rand(8, n, generator=g) * 2 - 1) / math.sqrt(n)).to(dev).requires_grad_()
            b = torch.zeros(o, 8, device=dev, requires_grad=True)
            d[m] = (a, b)
            params += [a, b]
        per.append(d)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ids = torch.tensor([[100 + ((i * 131 + j * 7) % 20000) for j in range(128)] for i in range(4)], device=dev)
    times = []
    for _ in range(steps):
        sync(dev)
        t = time.perf_counter()
        A = [{m: per[l][m][0].to(model.dtype).unsqueeze(0).expand(4, -1, -1) for m in MODULES} for l in range(layers)]
        B = [{m: per[l][m][1].to(model.dtype).unsqueeze(0).expand(4, -1, -1) for m in MODULES} for l in range(layers)]
        logits = model.forward(ids, lora=(A, B, 2.0))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sync(dev)
        times.append(time.perf_counter() - t)
    timed = times[1:] or times
    return 512 * len(timed) / sum(timed)


# ---------------------------------------------------------------- comparing
def log_softmax(x):
    return torch.log_softmax(torch.as_tensor(x, dtype=torch.float32), -1)


def deviation(got, ref):
    """Worst top-20 (of the reference) log-probability difference, and how many greedy
    tokens agree from the start."""
    lg, lt = log_softmax(got["logits"]), log_softmax(ref["logits"])
    top = torch.topk(lt, 20).indices
    worst = float((lg[top] - lt[top]).abs().max())
    same = 0
    while same < len(ref["greedy"]) and got["greedy"][same] == ref["greedy"][same]:
        same += 1
    return worst, same, int(lg.argmax()) == int(lt.argmax())


def compare(graft_cases, torch_cases, tol, bf16_cases=None):
    """graft against the fp32 reference. On a GPU (`bf16_cases`: PyTorch's own bf16 run of
    the same weights) the bound is bf16's: within `tol` or 1.5x PyTorch bf16's own deviation
    from fp32, whichever is larger; the greedy tokens agree as long as PyTorch bf16's do, or
    part where the reference's top two are within that bound."""
    rows, ok = [], True
    for k, (g, t) in enumerate(zip(graft_cases, torch_cases)):
        assert (g["prompt"], g["adapter"]) == (t["prompt"], t["adapter"])
        worst, same, top1 = deviation(g, t)
        bound, row = tol, {}
        if bf16_cases is not None:
            bw, bsame, btop1 = deviation(bf16_cases[k], t)
            bound = max(tol, 1.5 * bw)
            row = {"pytorch_bf16_top20_logprob_max_diff": bw, "pytorch_bf16_greedy_equal_steps": bsame,
                   "pytorch_bf16_top1_equal": btop1}
        margin = t["margins"][same] if same < len(t["greedy"]) else None
        agreed = margin is None or margin <= 2 * bound or (bf16_cases is not None and same >= row["pytorch_bf16_greedy_equal_steps"])
        good = top1 and worst <= bound and agreed
        ok &= good
        rows.append({"prompt": g["prompt"], "adapter": g["adapter"], "top20_logprob_max_diff": worst,
                     "bound": bound, "top1_equal": top1, "greedy_equal_steps": same,
                     "margin_at_divergence": margin, **row, "pass": good})
    return ok, rows


# ---------------------------------------------------------------- the kit and the run
def unpack(kit, work):
    """graft-gpu-check from the kit (xz) into `work`, executable."""
    src = kit / "graft-gpu-check.xz"
    dst = work / "graft-gpu-check"
    if src.exists():
        with lzma.open(src) as f, open(dst, "wb") as o:
            shutil.copyfileobj(f, o)
    else:
        shutil.copy(kit / "graft-gpu-check", dst)
    dst.chmod(dst.stat().st_mode | stat.S_IXUSR)
    return dst


def cuda_library_path():
    """Folders holding the CUDA 13 libraries graft links (cuBLAS, cuRAND, the runtime,
    NVRTC): PyTorch's wheels' and a toolkit's, whichever exist."""
    want = ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudart.so.13", "libnvrtc.so.13"]
    roots = [Path(p) for p in sys.path if p] + [Path("/usr/local/cuda"), Path("/usr/lib/x86_64-linux-gnu")]
    if shutil.which("nvcc"):
        roots.append(Path(shutil.which("nvcc")).resolve().parent.parent)
    found = {}
    for r in roots:
        if not r.is_dir():
            continue
        for w in want:
            if w in found:
                continue
            for hit in list(r.glob(f"nvidia/*/lib/{w}")) + list(r.glob(f"lib*/{w}")) + list(r.glob(w)):
                found[w] = str(hit.parent)
                break
    missing = [w for w in want if w not in found]
    return sorted(set(found.values())), missing


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kit", type=Path, default=HERE / "kit", help="graft-gpu-check(.xz) and meta/")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", type=Path, default=Path("/tmp/graft-gpu"),
                    help="where the model (540 MB) and the outputs are written")
    ap.add_argument("--report", type=Path, default=None,
                    help="also copy result.json here (the device tool's $OUT)")
    ap.add_argument("--quick", action="store_true", help="small figures (the CPU dry run)")
    ap.add_argument("--tol", type=float, default=None,
                    help="top-20 log-probability tolerance against the fp32 reference (default 5e-2 "
                         "on a GPU, raised to 1.5x PyTorch bf16's own deviation where that is larger: "
                         "graft holds bf16 weights and rounds every projection to bf16; 1e-3 on the "
                         "CPU, where both are f32)")
    ap.add_argument("--seed", type=int, default=15)
    a = ap.parse_args()
    gpu = a.device.startswith("cuda")
    tol = a.tol if a.tol is not None else (5e-2 if gpu else 1e-3)
    dev = torch.device("cuda:0" if gpu else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    a.work.mkdir(parents=True, exist_ok=True)
    report = {"device": a.device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if gpu else None, "tolerance": tol}
    print(f"device {a.device} ({report['gpu'] or 'cpu'}), torch {torch.__version__}", flush=True)

    cfg = json.loads((a.kit / "meta" / "config.json").read_text())
    mdir = a.work / "model"
    if mdir.exists():
        shutil.rmtree(mdir)
    mdir.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(a.kit / "meta" / f, mdir / f)
    W = random_model(cfg, a.seed)
    save_safetensors(mdir / "model.safetensors", W)
    lora = random_lora(W, cfg, 8, a.seed + 1)
    write_lora(a.work / "lora", lora, 8, 16)
    prompts = [[1, 504, 3458, 282, 4649, 314, 216], [(a.seed * 7919 + j * 104729) % 49000 + 100 for j in range(48)]]
    (a.work / "prompts.json").write_text(json.dumps({"prompts": prompts}))

    exe = unpack(a.kit, a.work)
    env = dict(os.environ)
    if gpu:
        paths, missing = cuda_library_path()
        if "libcurand.so.10" in missing and (a.kit / "fallback" / "libcurand.so.10").exists():
            # candle makes a cuRAND generator when it opens the device; graft draws nothing.
            paths.append(str(a.kit / "fallback"))
            missing.remove("libcurand.so.10")
            report["curand"] = "fallback (no random draws on the GPU)"
        env["LD_LIBRARY_PATH"] = ":".join(paths + [env.get("LD_LIBRARY_PATH", "")])
        report["ld_library_path"] = paths
        if missing:
            print(f"warning: not found: {missing}", flush=True)
    out = a.work / "graft.json"
    cmd = [str(exe), "--model", str(mdir), "--device", "cuda:0" if gpu else "cpu",
           "--prompts", str(a.work / "prompts.json"), "--lora", str(a.work / "lora"),
           "--out", str(out), "--server"] + (["--quick"] if a.quick else [])
    print("running", " ".join(cmd), flush=True)
    t = time.perf_counter()
    # graft-gpu-check writes its report after every section: what it measured before a
    # failure is kept, and the PyTorch side still runs.
    rc = subprocess.run(cmd, env=env).returncode
    report["graft_seconds"] = time.perf_counter() - t
    report["graft_exit_code"] = rc
    graft = json.loads(out.read_text()) if out.exists() else {"cases": []}

    # PyTorch: the fp32 reference first, then the figures in bf16 (fp32 on the CPU).
    ref = Llama(W, cfg, dev, torch.float32)
    lr = stack_loras([per_layer(lora, cfg["num_hidden_layers"])], [0], dev, torch.float32, 2.0)
    tcases = reference(ref, prompts, lr, 32)
    bcases = None
    if gpu:  # PyTorch's own bf16 run: how far bf16 arithmetic alone moves the figures
        refb = Llama(W, cfg, dev, torch.bfloat16)
        lrb = stack_loras([per_layer(lora, cfg["num_hidden_layers"])], [0], dev, torch.bfloat16, 2.0)
        bcases = reference(refb, prompts, lrb, 32)
        del refb
    ok, rows = compare(graft["cases"], tcases, tol, bcases)
    ok &= rc == 0 and len(rows) == len(tcases)
    report["correctness"] = {"pass": ok, "cases": rows}
    report["batch_invariance"] = graft.get("batch_invariance")
    report["server"] = graft.get("server")
    del ref
    perf_dtype = torch.bfloat16 if gpu else torch.float32
    m = Llama(W, cfg, dev, perf_dtype)
    big, small, decode, single, plen, tsteps = (8, 4, 8, 8, 64, 2) if a.quick else (256, 32, 64, 128, 512, 6)
    loras = [per_layer(random_lora(W, cfg, 16, 1000 + i, 0.02), cfg["num_hidden_layers"]) for i in range(small)]
    mixed = stack_loras(loras, list(range(small)), dev, perf_dtype, 2.0)
    def figure(f, *args):
        try:
            return f(*args)
        except Exception as e:  # recorded in its place; the other figures still run
            return {"error": repr(e)}

    tp = {
        "single_stream_decode_tok_s": figure(decode_rate, m, 1, single),
        "streams": {str(small): figure(decode_rate, m, small, decode),
                    str(big): figure(decode_rate, m, big, decode)},
        "mixed_lora_tok_s": figure(decode_rate, m, small, decode, mixed),
        "prefill_tok_s": figure(prefill_rate, m, plen),
        "lora_sft_tok_s": figure(train_rate, m, cfg, tsteps),
    }
    num = lambda x: isinstance(x, (int, float))
    ratio = lambda x, y: x / y if num(x) and num(y) and y else None
    tp["mixed_over_bare"] = ratio(tp["mixed_lora_tok_s"], tp["streams"][str(small)])
    gp = graft.get("perf") or {"streams": {}}
    gs = gp.get("streams", {})
    report["perf"] = {"graft": gp, "pytorch": tp, "dtype": str(perf_dtype), "graft_over_pytorch": {
        "single_stream_decode": ratio(gp.get("single_stream_decode_tok_s"), tp["single_stream_decode_tok_s"]),
        f"streams_{small}": ratio(gs.get(str(small)), tp["streams"][str(small)]),
        f"streams_{big}": ratio(gs.get(str(big)), tp["streams"][str(big)]),
        "prefill": ratio(gp.get("prefill_tok_s"), tp["prefill_tok_s"]),
        "mixed_lora": ratio(gp.get("mixed_lora_tok_s"), tp["mixed_lora_tok_s"]),
        "lora_sft": ratio(gp.get("lora_sft_tok_s"), tp["lora_sft_tok_s"]),
    }}
    (a.work / "result.json").write_text(json.dumps(report, indent=1))
    if a.report:
        a.report.mkdir(parents=True, exist_ok=True)
        shutil.copy(a.work / "result.json", a.report / "result.json")
    print(json.dumps({k: report[k] for k in ("correctness", "batch_invariance", "server", "perf")}, indent=1))
    print(f"correctness: {'PASS' if ok else 'FAIL'} (tolerance {tol}); result in {a.work / 'result.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
