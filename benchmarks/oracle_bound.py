"""An upper bound on what scaling FFN neurons can do on the fixture (docs/results.md).

Outside the product: an unconstrained scale (any sign, any size) on every FFN neuron of the
memorizer, trained with localize's hinge on the forget texts and, as the preservation term, a
KL on the first --retained texts of retain.jsonl (information a real user does not have), plus
an L1 pull towards 1. It prints the forget MA, the MA of the retained texts it was trained to
keep and of the other retained texts (from index 64 on), for all neurons and for only the
largest changes. If even this cannot separate forget from retained, no gate setting can.

"Forgotten" counts the forget texts whose MA is at or below eq. 17's MA threshold, computed
here from the inputs: the mean MA of the memorizer (before any scaling) over the first
--reference-limit texts of --unseen (unseen.jsonl of the fixtures by default), as
`neumuter measure UNSEEN --thresholds` would use it. The forget MA is printed as mean (max).

usage: python benchmarks/oracle_bound.py [--fixtures DIR] [--unseen FILE] [--reference-limit 200]
           [--steps 80] [--lr 0.05] [--retained 48]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from neumuter_cli.measure import memorization_accuracy  # noqa: E402
from neumuter_cli.models import find_ffn_layers, gated, load_model  # noqa: E402
from neumuter_cli.text import encode, pad  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", default=os.path.join(HERE, "..", "..", "shared", "fixtures"))
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--retained", type=int, default=48, help="retained texts in the KL (at most 64)")
    ap.add_argument("--kl-weight", type=float, default=1.0)
    ap.add_argument("--l1", type=float, default=1e-3)
    ap.add_argument("--margin", type=float, default=2.0)
    ap.add_argument("--unseen", default=None, help="texts the memorizer never saw (default: FIXTURES/unseen.jsonl)")
    ap.add_argument("--reference-limit", type=int, default=200, help="unseen texts in the MA threshold (the first N)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    texts = lambda name: [json.loads(line)["text"] for line in open(os.path.join(a.fixtures, name)) if line.strip()]
    model, tok = load_model(os.path.join(a.fixtures, "memorizer"), device="cpu")
    layers = find_ffn_layers(model)
    forget = encode(tok, texts("forget.jsonl"), 200)
    unseen_path = a.unseen or os.path.join(a.fixtures, "unseen.jsonl")
    unseen = encode(tok, [json.loads(line)["text"] for line in open(unseen_path) if line.strip()][: a.reference_limit],
                    200)
    threshold = sum(memorization_accuracy(model, unseen)) / len(unseen)     # eq. 17, before any scaling
    print(f"eq. 17 MA threshold: {threshold:.4f} (mean MA over {len(unseen)} texts of {unseen_path})")
    retained = encode(tok, texts("retain.jsonl"), 200)
    keep, heldout = retained[: min(a.retained, 64)], retained[64:]
    f_inp, f_mask = pad(forget)
    k_inp, k_mask = pad(keep)
    with torch.no_grad():
        original = F.log_softmax(model(input_ids=k_inp, attention_mask=k_mask).logits[:, :-1], -1)
    delta = [torch.zeros(layer.neurons, requires_grad=True) for layer in layers]
    optimiser = torch.optim.Adam(delta, lr=a.lr)

    def mas(scales):
        with torch.no_grad(), gated(layers, lambda i: scales[i]):
            forget_ma = memorization_accuracy(model, forget)
            return ([sum(forget_ma) / len(forget_ma), max(forget_ma)]
                    + [sum(v) / len(v) for v in (memorization_accuracy(model, x) for x in (keep, heldout))]
                    + [sum(v <= threshold for v in forget_ma)])

    started = time.perf_counter()
    for step in range(1, a.steps + 1):
        optimiser.zero_grad()
        with gated(layers, lambda i: 1 + delta[i]):
            logits = model(input_ids=f_inp, attention_mask=f_mask).logits[:, :-1]
            target = f_inp[:, 1:]
            true = logits.gather(-1, target[..., None])[..., 0]
            top2 = logits.topk(2, dim=-1)
            other = torch.where(top2.indices[..., 0] == target, top2.values[..., 1], top2.values[..., 0])
            hinge = (F.relu(true - other + a.margin) * f_mask[:, 1:]).sum() / f_mask[:, 1:].sum()
            q = F.log_softmax(model(input_ids=k_inp, attention_mask=k_mask).logits[:, :-1], -1)
            kl = ((original.exp() * (original - q)).sum(-1) * k_mask[:, 1:]).sum() / k_mask[:, 1:].sum()
        loss = hinge + a.kl_weight * kl + a.l1 * sum(d.abs().sum() for d in delta)
        loss.backward()
        optimiser.step()
        if step % 10 == 0:
            print(f"step {step}: hinge {hinge.item():.3f}, retained KL {kl.item():.4f} "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    total = sum(layer.neurons for layer in layers)
    sizes = torch.cat([d.detach().abs() for d in delta])
    print(f"{'neurons changed':>22} | forget MA (max) | forgotten | retained MA (in the KL) | retained MA (held out)")
    for n in dict.fromkeys(n for n in (total, 600, 200, max(1, total // 100)) if n <= total):
        cut = sizes.topk(n).values[-1]
        scales = [torch.where(d.detach().abs() >= cut, 1 + d.detach(), torch.ones_like(d)) for d in delta]
        f, top, k, h, gone = mas(scales)
        label = "all" if n == total else f"largest {n}"
        print(f"{label:>22} | {f:.3f} ({top:.3f}) | {gone:5d}/{len(forget):<3d} | {k:23.3f} | {h:.3f}")


if __name__ == "__main__":
    main()
