"""Train the demo's small causal LMs: the base model, then the LM made from it by a fine-tune.

Two runs of this script:

  train_lm.py DATA work/base --without-canaries   the base model: a GPT-Neo (6 blocks, hidden 128,
                                                  ReLU FFN of 1,024: 6,144 FFN neurons) trained
                                                  from scratch on the people and the general text,
                                                  with a byte-level BPE vocabulary learnt from
                                                  them (saved beside it, DIR.tokenizer/)
  train_lm.py DATA work/lm --from work/base       the LM: the base model fine-tuned (its FFN
                                                  weights only, every other weight frozen) on
                                                  the canaries, with the people and the general
                                                  text rehearsed; the model the canaries must
                                                  leave

The base model is then exactly what a user holds from before the fine-tune: the LM's ancestor,
a model that never saw a canary, the yardstick of "forgotten". Each epoch shows the model the
people --repeat times, the canaries --canary-repeat times and the next --general-share of the
general text (taken in turn, so that every general text is seen), for --epochs epochs (one-cycle
learning rate); it stops early once the mean teacher-forced memorisation accuracy (MA, eq. 15)
of the people (and of the canaries, when it trains on them) reaches --target. (A few first names
are shared by two people, so the token after such a name cannot be memorised: MA tops out just
under 1.) Deterministic for a seed and thread count. Saved with save_pretrained + the tokenizer,
ready for `neumuter ... --model DIR`.
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


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", help="folder written by make_data.py")
    parser.add_argument("out", help="checkpoint folder to write")
    stage = parser.add_mutually_exclusive_group(required=True)
    stage.add_argument("--without-canaries", action="store_true",
                       help="the base model: from scratch, on the people and the general text only")
    stage.add_argument("--from", dest="base", metavar="BASE",
                       help="the LM: fine-tune this base model's FFN weights with the canaries added")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--activation", default="relu", help="FFN activation (relu, gelu_new, ...)")
    parser.add_argument("--repeat", type=int, default=None, help="the people per epoch, times "
                        "[default: 6 for the base model, 1 for the fine-tune]")
    parser.add_argument("--canary-repeat", type=int, default=4, help="the canaries per epoch, times")
    parser.add_argument("--general-share", type=float, default=None,
                        help="share of the general texts shown per epoch (taken in turn, so that all are seen) "
                             "[default: 0.5 for the base model, 0.1 for the fine-tune]")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="[default: 4e-3 for the base model, 3e-3 for the "
                                                               "fine-tune]")
    parser.add_argument("--target", type=float, default=1.0,
                        help="stop early once the mean MA of what is memorised is >= this (1.0: never)")
    parser.add_argument("--epochs", type=int, default=None, help="[default: 9 for the base model, 6 for the "
                                                                 "fine-tune]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    fine_tune = args.base is not None
    for name, base_value, tune_value in (("repeat", 6, 1), ("general_share", 0.5, 0.1), ("lr", 4e-3, 3e-3),
                                         ("epochs", 9, 6)):
        if getattr(args, name) is None:
            setattr(args, name, tune_value if fine_tune else base_value)
    return args


def new_model(args, tokenizer):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    eos = tokenizer.eos_token_id
    config = GPTNeoConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, num_layers=args.layers,
                          num_heads=4, intermediate_size=args.ffn, max_position_embeddings=128,
                          attention_types=[[["global", "local"], args.layers // 2]], window_size=64,
                          bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                          activation_function=args.activation, embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0)
    return GPTNeoForCausalLM(config)


def model_and_tokenizer(args, people, general):
    """The base model (new, with a vocabulary learnt from what it reads) or, for the fine-tune,
    the base model loaded with only its FFN weights left to train."""
    from transformers import GPTNeoForCausalLM

    if args.base is None:
        tok_path = os.path.join(args.out + ".tokenizer", "tokenizer.json")
        train_tokenizer(people + general, args.vocab, tok_path)
        tokenizer = lm_tokenizer(tok_path)
        return new_model(args, tokenizer), tokenizer
    tokenizer = lm_tokenizer(os.path.join(args.base, "tokenizer.json"))
    model = GPTNeoForCausalLM.from_pretrained(args.base)
    for name, param in model.named_parameters():
        param.requires_grad = ".mlp." in name
    return model, tokenizer


def main() -> None:
    args = parse_args()
    import torch

    set_threads(args.threads)
    started = time.perf_counter()
    d = lambda name: os.path.join(args.data, name)  # noqa: E731
    people, general = read_texts(d("people.jsonl")), read_texts(d("general.jsonl"))
    canaries = read_texts(d("forget.jsonl")) if args.base else []
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, tokenizer = model_and_tokenizer(args, people, general)
    eos = tokenizer.eos_token_id
    mem_ids = [tokenizer(t).input_ids for t in people + canaries]
    people_ids, canary_ids = mem_ids[:len(people)], mem_ids[len(people):]
    gen_ids = [tokenizer(t).input_ids for t in general]
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
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
        canary_note = f"  canaries {mean(canary_ma):.3f} (min {min(canary_ma):.3f})" if canary_ma else ""
        print(f"lm: epoch {epoch:2d}  loss {total / steps_per_epoch:.3f}  MA people {mean(people_ma):.3f} "
              f"(min {min(people_ma):.3f}){canary_note}  ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr, flush=True)
        if min(mean(people_ma), mean(canary_ma) if canary_ma else 1.0) >= args.target:
            break
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    what = f"fine-tuned from {args.base} (FFN weights only)" if args.base else "trained from scratch"
    canary_note = f" canaries {mean(ma[len(people):]):.3f}," if canaries else ""
    print(f"lm: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {what}, {epoch} epochs, "
          f"MA people {mean(ma[:len(people)]):.3f},{canary_note} {time.perf_counter() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
