"""Smoke test of graft's OpenAI-compatible HTTP API with the official `openai` package.

Not part of CI (it needs `pip install openai`). Against a running graftd with
`--http-listen` (e.g. `make run`) and a tenant's key:

    python3 -m venv /tmp/oai && /tmp/oai/bin/pip install openai
    /tmp/oai/bin/python bench/peers/openai_smoke.py --base-url http://127.0.0.1:8000/v1 \
        --api-key "$GRAFT_API_KEY" [--train]

It lists the models, chats (unary and streamed, greedy: the two texts must agree), runs a
legacy completion with log-probabilities, uploads a small chat JSONL as a fine-tuning file
and, with --train, runs a fine-tuning job to its end and chats with its model.
"""

import argparse
import json
import sys
import tempfile
import time

from openai import OpenAI


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--train", action="store_true", help="also run a fine-tuning job")
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)

    models = client.models.list()
    base = models.data[0].id
    print("models:", [m.id for m in models.data])

    ask = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=base, messages=ask, temperature=0, max_tokens=24)
    unary = r.choices[0].message.content
    print("chat:", repr(unary), r.choices[0].finish_reason, r.usage)

    streamed = ""
    usage = None
    for chunk in client.chat.completions.create(
        model=base, messages=ask, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
    ):
        for c in chunk.choices:
            streamed += c.delta.content or ""
        usage = chunk.usage or usage
    print("stream:", repr(streamed), usage)
    assert streamed == unary, "the streamed text equals the unary one"

    c = client.completions.create(model=base, prompt="The three primary colours are",
                                  max_tokens=8, temperature=0, logprobs=2)
    print("completion:", repr(c.choices[0].text), c.choices[0].logprobs.tokens)

    rows = [
        {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                      {"role": "assistant", "content": f"ANSWER: {a + b}"}]}
        for a in range(1, 7) for b in range(1, 5)
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        path = f.name
    file = client.files.create(file=open(path, "rb"), purpose="fine-tune")
    print("file:", file.id, file.filename, file.bytes, file.status)

    if args.train:
        job = client.fine_tuning.jobs.create(
            training_file=file.id, model=base, suffix="smoke",
            hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 10},
        )
        print("job:", job.id, job.status, job.hyperparameters)
        while job.status not in ("succeeded", "failed", "cancelled"):
            time.sleep(2)
            job = client.fine_tuning.jobs.retrieve(job.id)
        events = client.fine_tuning.jobs.list_events(job.id, limit=3)
        print("job:", job.status, job.fine_tuned_model, [e.message for e in events.data])
        assert job.status == "succeeded", job.error
        r = client.chat.completions.create(
            model=job.fine_tuned_model, temperature=0, max_tokens=12,
            messages=[{"role": "user", "content": "What is 2 plus 2?"}])
        print("fine-tuned:", repr(r.choices[0].message.content))

    client.files.delete(file.id)
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
