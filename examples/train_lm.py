"""Train the demo's small causal LM until it has memorised the people and the canaries.

A GPT-Neo (6 blocks, hidden 128, ReLU FFN of 1,024: 6,144 FFN neurons) with a byte-level BPE vocabulary
trained here. Each epoch shows it the people --repeat times, the canaries --canary-repeat times
and the next --general-share of the general text (taken in turn, so that every general text is
seen), for --epochs epochs (one-cycle learning rate); it stops early once the people's and the
canaries' mean teacher-forced memorisation accuracy (MA, eq. 15) both reach --target.
(A few first names are shared by two people, so the token after such a name cannot be
memorised: MA tops out just under 1.) Deterministic for a seed and thread count.
Saved with save_pretrained + the tokenizer, ready for `neumuter ... --model DIR`.

Speed: the cost is the tokens trained on. Small batches (more steps per token), the people shown
more often and half of the general text per epoch memorise the people as well as the full
general text every epoch did, on two thirds of the tokens (about 40 s on one core, was 60 s).
The canaries are shown half as often as the people: memorised less deeply (MA about 0.84
against 0.98), they can be forgotten without taking the people with them.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

from common import lm_tokenizer, read_texts, set_threads, train_tokenizer


def mean(values):
    return sum(values) / len(values)


def pad(rows, pad_id):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask, labels


def accuracy(model, rows, pad_id):
    """Per text: share of positions whose argmax next token is the true one (MA)."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            chunk = rows[start : start + 64]
            ids, mask, _ = pad(chunk, pad_id)
            pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
            hit = (pred == ids[:, 1:]).float() * mask[:, 1:]
            out += (hit.sum(1) / mask[:, 1:].sum(1)).tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", help="folder written by make_data.py")
    parser.add_argument("out", help="checkpoint folder to write")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--activation", default="relu", help="FFN activation (relu, gelu_new, ...)")
    parser.add_argument("--repeat", type=int, default=6, help="the people per epoch, times")
    parser.add_argument("--canary-repeat", type=int, default=3, help="the canaries per epoch, times")
    parser.add_argument("--general-share", type=float, default=0.5,
                        help="share of the general texts shown per epoch (taken in turn, so that all are seen)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--target", type=float, default=1.0,
                        help="stop early once the people's and the canaries' mean MA are both >= this (1.0: never)")
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    set_threads(args.threads)
    started = time.perf_counter()
    d = lambda name: os.path.join(args.data, name)  # noqa: E731
    people, canaries = read_texts(d("people.jsonl")), read_texts(d("forget.jsonl"))
    memorised = people + canaries
    general = read_texts(d("general.jsonl"))
    # the vocabulary is learnt from everything the LM trains on (the masked LM shares it)
    tok_path = os.path.join(args.out + ".tokenizer", "tokenizer.json")
    train_tokenizer(memorised + general, args.vocab, tok_path)
    tokenizer = lm_tokenizer(tok_path)
    eos = tokenizer.eos_token_id

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    config = GPTNeoConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, num_layers=args.layers,
                          num_heads=4, intermediate_size=args.ffn, max_position_embeddings=128,
                          attention_types=[[["global", "local"], args.layers // 2]], window_size=64,
                          bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                          activation_function=args.activation, embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0)
    model = GPTNeoForCausalLM(config)
    mem_ids = [tokenizer(t).input_ids for t in memorised]
    people_ids, canary_ids = mem_ids[:len(people)], mem_ids[len(people):]
    gen_ids = [tokenizer(t).input_ids for t in general]
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    general_per_epoch = max(1, round(args.general_share * len(gen_ids)))
    rng.shuffle(gen_ids)
    rows_per_epoch = len(people_ids) * args.repeat + len(canary_ids) * args.canary_repeat + general_per_epoch
    steps_per_epoch = -(-rows_per_epoch // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=args.lr, pct_start=0.1,
                                                   total_steps=steps_per_epoch * args.epochs)
    ma = [0.0]
    for epoch in range(1, args.epochs + 1):
        model.train()
        first = (epoch - 1) * general_per_epoch
        general_now = [gen_ids[(first + k) % len(gen_ids)] for k in range(general_per_epoch)]
        rows = people_ids * args.repeat + canary_ids * args.canary_repeat + general_now
        rng.shuffle(rows)
        total = 0.0
        for start in range(0, len(rows), args.batch_size):
            ids, mask, labels = pad(rows[start : start + args.batch_size], eos)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            total += loss.item()
        model.eval()
        ma = accuracy(model, mem_ids, eos)
        people_ma, canary_ma = ma[: len(people)], ma[len(people):]
        print(f"lm: epoch {epoch:2d}  loss {total / steps_per_epoch:.3f}  MA people {mean(people_ma):.3f} "
              f"(min {min(people_ma):.3f})  canaries {mean(canary_ma):.3f} (min {min(canary_ma):.3f})  "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        if min(mean(people_ma), mean(canary_ma)) >= args.target:
            break
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    neurons = args.layers * args.ffn
    print(f"lm: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {neurons} FFN neurons, "
          f"{epoch} epochs, MA people {mean(ma[:len(people)]):.3f} canaries {mean(ma[len(people):]):.3f}, "
          f"{time.perf_counter() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
