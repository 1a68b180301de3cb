"""Inputs for `localize --base` whose KL term guards other texts than MLM neighbours, to tell
what the fixture's neurons allow from what the method finds.

--kind retained: each forget record's "neighbors" are retained texts themselves (RETAIN,
  dealt out in turn), information a user lacks: an upper bound, outside the product.
--kind continuations: the model's own greedy continuations of generic prompts (the first
  --prompt-tokens tokens of each text of PROMPTS), which carry its other memories where MLM
  neighbours of the forget texts do not; a user has these.

usage:
  python benchmarks/rollback_neighbours.py forget.neighbors.jsonl --kind retained \\
      --retain FIXTURES/retain.jsonl -o bound.jsonl
  python benchmarks/rollback_neighbours.py forget.neighbors.jsonl --kind continuations \\
      --model mem --prompts FIXTURES/unseen.jsonl -o continuations.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from neumuter_cli.measure import greedy_continuations  # noqa: E402
from neumuter_cli.models import load_model  # noqa: E402
from neumuter_cli.records import read_records  # noqa: E402


def deal(records: list[dict], texts: list[str], per_record: int) -> list[dict]:
    """Each record with ``per_record`` of ``texts`` as its neighbours, dealt out in turn."""
    out = []
    for i, record in enumerate(records):
        chosen = [texts[(i * per_record + j) % len(texts)] for j in range(per_record)]
        out.append({**record, "neighbors": chosen})
    return out


def continuations(model_path: str, prompts: list[str], prompt_tokens: int, new_tokens: int) -> list[str]:
    model, tokenizer = load_model(model_path, device="cpu")
    rows = [(tokenizer(text).input_ids[:prompt_tokens], new_tokens) for text in prompts]
    generated = greedy_continuations(model, rows, batch_size=32)
    return [tokenizer.decode(context + new) for (context, _), new in zip(rows, generated)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", help="forget records (their own neighbours are replaced)")
    ap.add_argument("--kind", choices=["retained", "continuations"], required=True)
    ap.add_argument("--retain", help="--kind retained: the retained texts")
    ap.add_argument("--model", help="--kind continuations: the model that continues the prompts")
    ap.add_argument("--prompts", help="--kind continuations: texts whose first tokens are the prompts")
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=192)
    ap.add_argument("--per-record", type=int, default=4)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    records = read_records(a.input)
    if a.kind == "retained":
        texts = [r["text"] for r in read_records(a.retain)]
    else:
        count = len(records) * a.per_record
        prompts = [r["text"] for r in read_records(a.prompts)][:count]
        texts = continuations(a.model, prompts, a.prompt_tokens, a.new_tokens)
    with open(a.output, "w", encoding="utf-8") as handle:
        for record in deal(records, texts, a.per_record):
            handle.write(json.dumps(record) + "\n")
    print(f"{len(records)} records, {a.per_record} {a.kind} texts each: {a.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
