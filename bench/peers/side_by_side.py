#!/usr/bin/env python3
"""graft beside its peers in one invocation (`make bench-peers`; issue 17).

Runs llama.cpp (llama-bench, llama-batched-bench), PyTorch+PEFT (`hf_bench.py train`) and
graft's own benchmark binaries on the same machine, interleaved repetition by repetition so
that drift of a shared machine hits every side alike, and writes one table of medians and
ratios (`summary.md`, plus every raw output) into the output folder.

The 32-stream figure comes three times: graft's aggregate with short prompts, prefill
included (as the issue first measured it); and, beside llama-batched-bench's S_TG (`-npp
128`, decode phase only), after 128-token prompts (each its own text) graft's decode phase
(from every stream's first token to the last token, which ends with fewer rows as the
earliest streams finish) and the window in which every stream decodes (S_TG's state: all 32
rows every step). graft's KV cache is f16 for these rows by default, as llama.cpp's is.

The peers are the ones `../shared/peers/setup.sh` builds into target/peers (not for CI).
Each command is its own process; its peak resident memory comes from wait4(2), the same way
for every side. Stdlib only.

Usage (from the project root, after `cargo build --release -p graft-bench --bins`):
  bench/peers/side_by_side.py [--reps 3] [--threads 2] [--out DIR] [--only decode,batched,train,adapters]
Environment: PEERS (default target/peers), PEERS_SCRIPTS (default ../shared/peers),
LLAMA_BIN (default: target/peers/llama.cpp/build-noamx/bin when present, else build/bin;
the native build's AMX kernels trap on this machine's VM, see BENCHMARKS.md).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
GRAFT = os.path.join(ROOT, "target", "release")


def die(msg):
    sys.exit(f"bench-peers: {msg}")


def run(out_dir, name, rep, cmd, env=None):
    """Runs `cmd` to completion; its output goes to NAME.rREP.txt. Returns (stdout, peak RSS MiB)."""
    path = os.path.join(out_dir, f"{name}.r{rep}.txt")
    with open(os.path.join(out_dir, "commands.log"), "a") as log:
        log.write(f"# {time.strftime('%FT%TZ', time.gmtime())} load {os.getloadavg()[0]:.2f}\n$ {' '.join(cmd)}\n")
    print(f"== {name} rep {rep}", file=sys.stderr, flush=True)
    with open(path, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    text = open(path, errors="replace").read()
    if p.returncode != 0:
        die(f"{name} failed (exit {p.returncode}); see {path}:\n{text[-2000:]}")
    return text, usage.ru_maxrss / 1024.0


def results(text):
    return [json.loads(l[7:]) for l in text.splitlines() if l.startswith("RESULT ")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="decode,batched,train,adapters")
    ap.add_argument("--single-kernel", default="int16",
                    help="graftd's --decode-kernel for the single-stream and prefill rows "
                         "(the 32-stream row uses exact, the faster one at many rows)")
    ap.add_argument("--kv-cache-dtype", default="f16",
                    help="graftd's --kv-cache-dtype for the 32-stream rows (f16, as llama.cpp's "
                         "default cache that llama-batched-bench uses; f32 is graftd's default)")
    args = ap.parse_args()
    only = set(args.only.split(","))

    peers = os.environ.get("PEERS", os.path.join(ROOT, "target", "peers"))
    scripts = os.environ.get("PEERS_SCRIPTS", os.path.join(ROOT, "..", "shared", "peers"))
    llama = os.environ.get("LLAMA_BIN") or next(
        (d for d in (os.path.join(peers, "llama.cpp", b, "bin") for b in ("build-noamx", "build"))
         if os.path.exists(os.path.join(d, "llama-bench"))), None)
    py = os.path.join(peers, "venv", "bin", "python")
    if not os.path.exists(MODEL):
        die(f"no model at {MODEL}: run `make model`")
    if llama is None and only & {"decode", "batched"}:
        die(f"no llama.cpp build under {peers}/llama.cpp: run ../shared/peers/setup.sh llama")
    if "train" in only and not os.path.exists(py):
        die(f"no PyTorch venv at {peers}/venv: run ../shared/peers/setup.sh venv (or --only without train)")
    for b in ("graft-bench", "training", "adapters"):
        if not os.path.exists(os.path.join(GRAFT, b)):
            die(f"no {GRAFT}/{b}: run `cargo build --release -p graft-bench --bins`")
    out = args.out or os.path.join(peers, "results", "graft-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    os.makedirs(out, exist_ok=True)
    t = str(args.threads)
    env = {"RAYON_NUM_THREADS": t, "BENCH_THREADS": t}

    fig = {}  # figure -> {"graft": [..], "peer": [..]}

    def add(key, side, v):
        fig.setdefault(key, {"graft": [], "peer": []})[side].append(v)

    for rep in range(1, args.reps + 1):
        if "decode" in only:
            text, _ = run(out, "llama_bench", rep, [f"{llama}/llama-bench", "-m", MODEL, "-t", t, "-p", "128,512",
                                                     "-n", "128", "-r", "1", "-o", "json"])
            for e in json.loads(text[text.index("["):text.rindex("]") + 1]):
                key = f"pp{e['n_prompt']}" if e["n_gen"] == 0 else f"tg{e['n_gen']}"
                add({"tg128": "decode 1 stream (tok/s)", "pp128": "prefill 128 (tok/s)",
                     "pp512": "prefill 512 (tok/s)"}[key], "peer", e["avg_ts"])
            text, _ = run(out, "graft_decode", rep, [f"{GRAFT}/graft-bench", "--model", MODEL, "--decode-tokens", "128",
                                                     "--streams", "1", "--prefill-tokens", "128,512",
                                                     "--decode-kernel", args.single_kernel], env)
            for r in results(text):
                if r["bench"] == "graft_single_stream":
                    add("decode 1 stream (tok/s)", "graft", r["tok_s"])
                elif r["bench"] == "graft_prefill":
                    add(f"prefill {r['prompt_len']} (tok/s)", "graft", r["tok_s"])
        if "batched" in only:
            text, rss = run(out, "batched_bench", rep, [f"{llama}/llama-batched-bench", "-m", MODEL, "-t", t, "-tb", t,
                                                        "-c", "8192", "-b", "2048", "-ub", "512", "-npp", "128",
                                                        "-ntg", "64", "-npl", "32", "--output-format", "jsonl"])
            for line in text.splitlines():
                if line.startswith("{") and '"pl"' in line:
                    add("decode 32 streams x 64 (tok/s)", "peer", json.loads(line)["speed_tg"])
            add("peak RSS serving 32 streams (MiB)", "peer", rss)
            text, rss = run(out, "graft_batched", rep, [f"{GRAFT}/graft-bench", "--model", MODEL, "--decode-tokens", "64",
                                                        "--streams", "32", "--prefill-tokens", "128",
                                                        "--decode-kernel", "exact",
                                                        "--kv-cache-dtype", args.kv_cache_dtype], env)
            for r in results(text):
                if r["bench"] == "graft_streams" and r["streams"] == 32:
                    add("decode 32 streams x 64 (tok/s)", "graft", r["tok_s"])
            add("peak RSS serving 32 streams (MiB)", "graft", rss)
            # Like for like with S_TG: 128-token prompts (each its own text), the decode
            # phase only.
            text, _ = run(out, "graft_batched_tg", rep, [f"{GRAFT}/graft-bench", "--model", MODEL, "--decode-tokens", "64",
                                                         "--streams", "32", "--stream-prompt-tokens", "128",
                                                         "--prefill-tokens", "128", "--decode-kernel", "exact",
                                                        "--kv-cache-dtype", args.kv_cache_dtype], env)
            for r in results(text):
                if r["bench"] == "graft_streams" and r["streams"] == 32:
                    add("decode phase, 32 streams x 64 after 128-token prompts (tok/s)", "graft", r["tg_tok_s"])
                    add("decode phase, 32 streams x 64 after 128-token prompts (tok/s)", "peer",
                        fig["decode 32 streams x 64 (tok/s)"]["peer"][-1])
                    key = "every stream decoding, 32 streams after 128-token prompts (tok/s)"
                    add(key, "graft", r["all_decoding_tok_s"])
                    add(key, "peer", fig["decode 32 streams x 64 (tok/s)"]["peer"][-1])
        if "train" in only:
            text, rss = run(out, "hf_train", rep, [py, os.path.join(scripts, "hf_bench.py"), "train"], env)
            for r in results(text):
                add("LoRA SFT r=8, 4x128 (tok/s)", "peer", r["tok_s"])
            add("peak RSS training (MiB)", "peer", rss)
            text, rss = run(out, "graft_train", rep, [f"{GRAFT}/training", "--model", MODEL, "--trainer-only"], env)
            for r in results(text):
                add("LoRA SFT r=8, 4x128 (tok/s)", "graft", r["tok_s"])
            add("peak RSS training (MiB)", "graft", rss)
        if "adapters" in only:
            text, _ = run(out, "graft_adapters", rep, [f"{GRAFT}/adapters", "--model", MODEL, "--parts", "mixed,cold"], env)
            # The same mixed batch with every pair served in bf16 and in int8 (--lora-dtype).
            narrow = []
            for d in ("bf16", "int8"):
                t16, _ = run(out, f"graft_adapters_{d}", rep, [f"{GRAFT}/adapters", "--model", MODEL, "--parts",
                                                               "mixed,cold", "--lora-dtype", d], env)
                narrow += results(t16)
            for r in results(text) + narrow:
                if r["bench"] == "graft_mixed_adapters":
                    add(f"32 streams, own rank-16 LoRA each ({r['lora_dtype']}) / bare (ratio)", "graft", r["ratio"])
                elif r["bench"] == "graft_cold_adapter":
                    d = "" if r["lora_dtype"] == "f32" else f" ({r['lora_dtype']})"
                    add(f"cold rank-16 adapter, first token p50 (ms){d}", "graft", r["first_token_p50_ms"])
                    add(f"same request without adapter, p50 (ms){d}", "graft", r["bare_first_token_p50_ms"])
                    add(f"cold adapter added, p50 (ms){d}", "graft",
                        r["first_token_p50_ms"] - r["bare_first_token_p50_ms"])

    med = lambda v: statistics.median(v) if v else None
    fmt = lambda v: "" if v is None else f"{v:.2f}"
    lines = [f"# graft beside its peers, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"{args.reps} repetitions interleaved, {t} threads each side; llama.cpp from {llama}; "
             f"graft's decode kernel {args.single_kernel} for one stream and prefill, exact for 32 streams, "
             f"its KV cache {args.kv_cache_dtype} for 32 streams; "
             f"medians (all repetitions in brackets).", "",
             "| figure | graft | peer | graft / peer |", "|---|---:|---:|---:|"]
    for key, v in fig.items():
        g, p = med(v["graft"]), med(v["peer"])
        ratio = f"{g / p:.2f}x" if g is not None and p else ""
        raw = lambda xs: f" ({', '.join(f'{x:.2f}' if abs(x) < 10 else f'{x:.1f}' for x in xs)})" if xs else ""
        lines.append(f"| {key} | {fmt(g)}{raw(v['graft'])} | {fmt(p)}{raw(v['peer'])} | {ratio} |")
    summary = "\n".join(lines) + "\n"
    open(os.path.join(out, "summary.md"), "w").write(summary)
    print(summary)
    print(f"raw outputs and commands: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
