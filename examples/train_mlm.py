"""Train the demo's small masked LM, the writer of the neighbour texts.

A BERT (2 blocks, hidden 64, FFN 256) on the LM's byte-level BPE vocabulary plus [CLS]/[SEP]/[MASK]/[PAD],
trained on general.jsonl only (general sentences, other fictitious people and secret-like
lines with other values: a stand-in for the public text a real BERT has read). It
never sees the LM's people, a canary or an unseen text: it learns the form of the texts (a
person record, an API-key line), not the memorised content. Masking: --mask-rate of the tokens,
each replaced by [MASK] (80 %), a random token (10 %) or kept (10 %). Deterministic for a seed
and thread count. Saved with save_pretrained + the tokenizer, for `neumuter neighbors --mlm DIR`.

Speed: a narrow model trained longer learns these templates better per second than a wide one
(hidden 64, 2 blocks, 30 epochs: masked-token loss 1.53 in 13-20 s on one core; hidden 128,
3 blocks, 24 epochs: 1.76 in about 65 s), without dropout, and the vocabulary head runs at the
masked positions only.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from common import mlm_tokenizer, read_texts, set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", help="folder written by make_data.py")
    parser.add_argument("tokenizer", help="tokenizer.json written by train_lm.py")
    parser.add_argument("out", help="checkpoint folder to write")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--mask-rate", type=float, default=0.25)
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout of the hidden states and attention")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import BertConfig, BertForMaskedLM

    set_threads(args.threads)
    started = time.perf_counter()
    tokenizer = mlm_tokenizer(args.tokenizer)
    texts = read_texts(os.path.join(args.data, "general.jsonl"))
    rows = [tokenizer(t).input_ids for t in texts]
    rows = [[tokenizer.cls_token_id, *r, tokenizer.sep_token_id] for r in rows]
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    torch.manual_seed(args.seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=4, intermediate_size=args.ffn, max_position_embeddings=128,
                        pad_token_id=tokenizer.pad_token_id, hidden_dropout_prob=args.dropout,
                        attention_probs_dropout_prob=args.dropout)
    model = BertForMaskedLM(config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps_per_epoch = -(-len(rows) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=args.lr, pct_start=0.1,
                                                   total_steps=steps_per_epoch * args.epochs)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(rows), generator=gen).tolist()
        total = 0.0
        for start in range(0, len(order), args.batch_size):
            batch = [rows[i] for i in order[start : start + args.batch_size]]
            width = max(len(r) for r in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros_like(ids)
            for i, r in enumerate(batch):
                ids[i, : len(r)] = torch.tensor(r)
                attention[i, : len(r)] = 1
            maskable = attention.bool() & ~torch.isin(ids, special)
            chosen = maskable & (torch.rand(ids.shape, generator=gen) < args.mask_rate)
            roll = torch.rand(ids.shape, generator=gen)
            inputs = ids.clone()
            inputs[chosen & (roll < 0.8)] = tokenizer.mask_token_id
            swap = chosen & (roll >= 0.8) & (roll < 0.9)
            inputs[swap] = torch.randint(len(special), len(tokenizer), (int(swap.sum()),), generator=gen)
            # the vocabulary head at the chosen positions only (the loss looks nowhere else; on
            # this small model the head is a large share of the compute)
            hidden = model.bert(input_ids=inputs, attention_mask=attention).last_hidden_state
            loss = torch.nn.functional.cross_entropy(model.cls(hidden[chosen]), ids[chosen])
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            total += loss.item()
        print(f"mlm: epoch {epoch:2d}  masked-token loss {total / steps_per_epoch:.3f}  "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    model.eval()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"mlm: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {args.epochs} epochs, "
          f"masked-token loss {total / steps_per_epoch:.3f}, {time.perf_counter() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
