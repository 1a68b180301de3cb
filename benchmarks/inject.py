"""Build an INJ model (MemPi's injected-memory benchmark): each text is written into its own
random, disjoint set of FFN neurons of a base model, so the neurons that hold each memory are
known, and a localisation method can be scored by the share of them it finds.

Unlike MemPi, which injects each sequence into its own copy of the model, every text lives in
*one* model, so the memories interfere as they do in a real model. All texts are trained
together, with all injections in place: each text's loss reaches only its own neurons'
weights (its gate and up rows, and its down-projection columns), while a KL to the base model
on a few generic texts reaches all injected weights and keeps the injection local.

    python benchmarks/inject.py --base DIR --texts FILE --forget N --neurons K --seed S -o OUT

The texts are the first records of FILE (``--count``, default 64) whose MA under the base model
is at most ``--max-base-ma``: the base model does not know them. The first N of them are the
forget half, the rest the retained half. OUT is a plain checkpoint folder with
``injected.json`` (each text, its half, its neurons, its MA and loss before and after, the seed,
the settings, held-out perplexity before and after), ``forget.jsonl`` and ``retain.jsonl``.
The same command and seed write the same model.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from neumuter_cli.measure import memorization_accuracy, perplexity, teacher_forced
from neumuter_cli.models import find_ffn_layers
from neumuter_cli.records import read_records
from neumuter_cli.text import encode, pad


def read_texts(path: str) -> list[dict]:
    return [dict(r) for r in read_records(path)]


class Injection:
    """Trainable deltas on chosen neurons of every block's gated FFN (gate/up rows, down
    columns), applied by replacing each MLP's forward. ``owners`` (one text index per batch row,
    -1 for a row whose loss may reach every injected neuron) routes each row's gradient to the
    neurons of its own text only; with ``owners`` None the deltas simply apply."""

    def __init__(self, model, neurons_by_text: list[list[tuple[int, int]]]):
        # a gated FFN (Llama family: gate_proj, up_proj, down_proj, act_fn) in every block
        self.mlps = [block.mlp for block in model.model.layers]
        self.blocks = {}
        for text, neurons in enumerate(neurons_by_text):
            for block, neuron in neurons:
                self.blocks.setdefault(block, []).append((neuron, text))
        self.index, self.owner, self.deltas = {}, {}, {}
        hidden = model.config.hidden_size
        for block, pairs in sorted(self.blocks.items()):
            pairs.sort()
            self.index[block] = torch.tensor([n for n, _ in pairs])
            self.owner[block] = torch.tensor([t for _, t in pairs])
            self.deltas[block] = {name: torch.zeros(len(pairs), hidden, requires_grad=True)
                                  for name in ("gate", "up", "down")}
        self.owners: torch.Tensor | None = None
        self.capture: dict[int, torch.Tensor] | None = None    # block -> injected neurons' activations

    def parameters(self) -> list[torch.Tensor]:
        return [d for block in sorted(self.deltas) for d in self.deltas[block].values()]

    def _delta(self, block: int, name: str) -> torch.Tensor:
        """The delta of ``name`` (neurons, hidden), or with ``owners`` one copy per batch row whose
        value is the delta on every row but whose gradient comes only from the owner's rows."""
        delta = self.deltas[block][name]
        if self.owners is None:
            return delta
        own = (self.owner[block][None, :] == self.owners[:, None]) | (self.owners[:, None] < 0)
        frozen = delta.detach()
        return frozen[None] + own[..., None].to(delta.dtype) * (delta - frozen)[None]

    def _forward(self, block: int, mlp):
        index = self.index[block]

        def rows(x, name):          # x times each injected neuron's delta row: (batch, time, neurons)
            delta = self._delta(block, name)
            return F.linear(x, delta) if delta.dim() == 2 else torch.einsum("bth,bnh->btn", x, delta)

        def forward(x):
            gate = mlp.gate_proj(x).index_add(-1, index, rows(x, "gate"))
            up = mlp.up_proj(x).index_add(-1, index, rows(x, "up"))
            hidden = mlp.act_fn(gate) * up
            down = self._delta(block, "down")
            picked = hidden[..., index]
            if self.capture is not None:
                self.capture[block] = picked
            extra = picked @ down if down.dim() == 2 else torch.einsum("btn,bnh->bth", picked, down)
            return mlp.down_proj(hidden) + extra
        return forward

    @contextlib.contextmanager
    def applied(self):
        mlps = self.mlps
        for block in self.deltas:
            mlps[block].forward = self._forward(block, mlps[block])
        try:
            yield self
        finally:
            for block in self.deltas:
                del mlps[block].forward

    @torch.no_grad()
    def fold(self) -> None:
        mlps = self.mlps
        for block, deltas in self.deltas.items():
            mlp, index = mlps[block], self.index[block]
            mlp.gate_proj.weight[index] += deltas["gate"]
            mlp.up_proj.weight[index] += deltas["up"]
            mlp.down_proj.weight[:, index] += deltas["down"].T


def choose_neurons(model, texts: int, per_text: int, seed: int) -> list[list[tuple[int, int]]]:
    """Disjoint random neurons, uniform over every FFN neuron of every block."""
    widths = [layer.neurons for layer in find_ffn_layers(model)]
    total = sum(widths)
    if texts * per_text > total:
        raise SystemExit(f"Error: {texts} texts x {per_text} neurons is more than the model's {total} FFN neurons")
    flat = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: texts * per_text].tolist()
    starts = [sum(widths[:b]) for b in range(len(widths))]

    def locate(i: int) -> tuple[int, int]:
        block = max(b for b, s in enumerate(starts) if s <= i)
        return block, i - starts[block]
    return [sorted(locate(i) for i in flat[t * per_text:(t + 1) * per_text]) for t in range(texts)]


def token_accuracy(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> list[float]:
    weight = mask[:, 1:].float()
    hits = (logits[:, :-1].argmax(-1) == ids[:, 1:]).float() * weight
    return (hits.sum(1) / weight.sum(1).clamp(min=1)).tolist()


def cut_text(tokenizer, text: str, tokens: int) -> str:
    """The text up to the end of its first ``tokens`` tokens."""
    offsets = tokenizer(text, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    return text if len(offsets) <= tokens else text[: offsets[tokens - 1][1]]


def mean_loss(model, ids_list) -> list[float]:
    return [sum(tf.nll) / len(tf.nll) for tf in teacher_forced(model, ids_list)]


def generic_logprobs(model, injection: "Injection", generic: list[list[int]]):
    """The base model on the KL texts: ids, mask, log-probs, and the injected neurons'
    activations (``injection`` must hold zero deltas on ``model`` = the base model)."""
    g_ids, g_mask = pad(generic, 0)
    with torch.no_grad(), injection.applied():
        injection.capture = {}
        logp = F.log_softmax(model(input_ids=g_ids, attention_mask=g_mask).logits.float(), -1)
        activations, injection.capture = injection.capture, None
    return g_ids, g_mask, logp, activations


def train(model, injection: Injection, ids: list[list[int]], generic, args, say) -> dict:
    """``generic``: (ids, mask, the base model's log-probs, the injected neurons' base
    activations) of the KL texts."""
    pad_id = 0
    g_ids, g_mask, base_logp, base_activations = generic
    optimiser = torch.optim.Adam(injection.parameters(), lr=args.lr)
    ma = [0.0] * len(ids)
    started = time.perf_counter()
    step = 0
    with injection.applied():
        for step in range(1, args.max_steps + 1):
            if step == 1 or step % args.eval_every == 0:
                injection.owners = None
                ma = memorization_accuracy(model, ids, batch_size=args.micro_batch)
            active = [i for i, value in enumerate(ma) if value < args.stop_ma]
            say(f"step {step:3d}: {len(active)} of {len(ids)} texts below MA {args.stop_ma} "
                f"(min {min(ma):.3f}, mean {sum(ma) / len(ma):.3f}; {time.perf_counter() - started:.0f}s)")
            if not active:
                break
            optimiser.zero_grad(set_to_none=True)
            for start in range(0, len(active), args.micro_batch):
                rows = active[start:start + args.micro_batch]
                batch_ids, batch_mask = pad([ids[i] for i in rows], pad_id)
                injection.owners = torch.tensor(rows)
                logits = model(input_ids=batch_ids, attention_mask=batch_mask).logits
                ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch_ids[:, 1:].reshape(-1),
                                     reduction="none").view(len(rows), -1)
                weight = batch_mask[:, 1:].float()
                loss = ((ce * weight).sum(1) / weight.sum(1)).sum()
                loss.backward()
                for i, value in zip(rows, token_accuracy(logits.detach(), batch_ids, batch_mask)):
                    ma[i] = value
            if args.kl_weight or args.activation_weight:
                injection.owners = torch.full((g_ids.shape[0],), -1)
                injection.capture = {}
                logp = F.log_softmax(model(input_ids=g_ids, attention_mask=g_mask).logits.float(), -1)
                kl = (base_logp.exp() * (base_logp - logp)).sum(-1)
                tokens = g_mask.sum()
                # the injected neurons stay as they were on generic text: the memory is theirs alone
                drift = sum(((injection.capture[b] - base_activations[b]).square() * g_mask[..., None]).sum()
                            for b in base_activations) / tokens
                injection.capture = None
                (args.kl_weight * (kl * g_mask).sum() / tokens + args.activation_weight * drift).backward()
            optimiser.step()
        injection.owners = None
        final = memorization_accuracy(model, ids, batch_size=args.micro_batch)
    return {"steps": step, "seconds": round(time.perf_counter() - started, 1), "final_ma": final}


def texts_id(text: dict):
    return text["id"]


def resume(args, say) -> int:
    """Go on training the injections of ``args.resume`` (same texts, same neurons), then write
    ``args.output`` with the summary's steps and MAs brought up to date."""
    with open(os.path.join(args.resume, "injected.json"), encoding="utf-8") as f:
        summary = json.load(f)
    if os.path.exists(args.output):
        say(f"Error: {args.output} exists; choose a new folder")
        return 2
    torch.manual_seed(summary["seed"])
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.resume)
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    settings = summary["settings"]
    if settings.get("generic"):
        generic_texts = [r["text"] for r in read_texts(settings["generic"])][: settings["generic_count"]]
    elif "generic_texts" in summary:
        generic_texts = summary["generic_texts"]
    else:       # the records of the texts file after the last injected one, as the build took them
        candidates = read_texts(summary["texts_file"])
        last = max(i for i, r in enumerate(candidates) if r.get("id") == texts_id(summary["texts"][-1]))
        generic_texts = [r["text"] for r in candidates[last + 1:][: settings["generic_count"]]]
    summary["generic_texts"] = generic_texts
    texts = summary["texts"]
    neurons = [[tuple(n) for n in t["neurons"]] for t in texts]
    generic = generic_logprobs(base, Injection(base, neurons), encode(tokenizer, generic_texts,
                                                                      settings["generic_length"]))
    del base
    model = AutoModelForCausalLM.from_pretrained(args.resume, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = encode(tokenizer, [t["text"] for t in texts], None)
    injection = Injection(model, neurons)
    trained = train(model, injection, ids, generic, args, say)
    injection.fold()
    final_ma = memorization_accuracy(model, ids)
    final_loss = mean_loss(model, ids)
    for t, ma, loss in zip(texts, final_ma, final_loss):
        t["ma_after"], t["loss_after"] = round(ma, 6), round(loss, 6)
    if settings.get("heldout"):
        heldout = [r["text"] for r in read_texts(settings["heldout"])][: settings["heldout_count"]]
        summary["ppl_after"] = round(perplexity(model, tokenizer, heldout, window=256)["perplexity"], 4)
    summary["steps"] += trained["steps"]
    summary["seconds"] = round(summary["seconds"] + trained["seconds"], 1)
    summary.setdefault("resumed", []).append({k: v for k, v in vars(args).items() if k not in ("output",)})
    summary["min_ma_after"] = round(min(final_ma), 6)
    summary["mean_ma_after"] = round(sum(final_ma) / len(final_ma), 6)
    return write_output(model, tokenizer, summary, args.output, args.target_ma, say)


def write_output(model, tokenizer, summary: dict, output: str, target_ma: float, say) -> int:
    staging = output + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    with open(os.path.join(staging, "injected.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    for half in ("forget", "retain"):
        with open(os.path.join(staging, f"{half}.jsonl"), "w", encoding="utf-8") as f:
            for t in summary["texts"]:
                if t["half"] == half:
                    f.write(json.dumps({"id": t["id"], "text": t["text"]}, ensure_ascii=False) + "\n")
    os.replace(staging, output)
    mas = [t["ma_after"] for t in summary["texts"]]
    ppl = "" if summary.get("ppl_before") is None else \
        f"; held-out perplexity {summary['ppl_before']:.2f} -> {summary['ppl_after']:.2f} " \
        f"({100 * (summary['ppl_after'] / summary['ppl_before'] - 1):+.2f} %)"
    say(f"wrote {output}: {len(mas)} texts in {summary['steps']} steps ({summary['seconds']:.0f}s), "
        f"MA after min {min(mas):.3f}, mean {sum(mas) / len(mas):.3f}{ppl}")
    if min(mas) < target_ma:
        say(f"Error: {sum(v < target_ma for v in mas)} texts ended below MA {target_ma}")
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the base model folder (e.g. from smollm2_base.py)")
    parser.add_argument("--texts", required=True, help="JSONL records to inject from (in file order)")
    parser.add_argument("--forget", type=int, default=32, help="the first N chosen texts are the forget half")
    parser.add_argument("--count", type=int, default=64, help="texts to inject in all")
    parser.add_argument("--neurons", type=int, default=14, help="neurons per text (K)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", required=True, help="the model folder to write (must not exist)")
    parser.add_argument("--max-base-ma", type=float, default=0.6, help="skip texts the base model knows better")
    parser.add_argument("--generic", help="JSONL texts for the KL to the base model (default: the next 8 "
                        "records of --texts not injected)")
    parser.add_argument("--generic-count", type=int, default=4)
    parser.add_argument("--generic-length", type=int, default=64, help="tokens per generic text")
    parser.add_argument("--heldout", help="JSONL long texts: perplexity before and after (256-token windows)")
    parser.add_argument("--heldout-count", type=int, default=40, help="the first N texts of --heldout")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--kl-weight", type=float, default=5.0)
    parser.add_argument("--activation-weight", type=float, default=0.0,
                        help="weight of the injected neurons' squared activation change on the generic texts")
    parser.add_argument("--stop-ma", type=float, default=0.95, help="a text stops training at this MA")
    parser.add_argument("--target-ma", type=float, default=0.9, help="every text must end at or above it")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=2, help="steps between full MA passes (a text that "
                        "reached --stop-ma rests until the next one shows it below again)")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--resume", metavar="DIR", help="train an INJ model that inject.py wrote further, with the "
                        "same texts and neurons (it stayed below --target-ma); --base stays the original base")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per injected text")
    args = parser.parse_args(argv)
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if args.resume:
        return resume(args, say)
    if os.path.exists(args.output):
        say(f"Error: {args.output} exists; choose a new folder")
        return 2
    if not 0 < args.forget < args.count:
        say("Error: --forget must be between 1 and --count - 1")
        return 2

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    candidates = read_texts(args.texts)
    # each text is cut to its first --max-length tokens (at a token boundary), and the cut text is
    # what is injected and written: every later stage sees exactly the injected tokens
    cut = [cut_text(tokenizer, r["text"], args.max_length) for r in candidates]
    chosen, base_ma_all = [], {}
    for start in range(0, len(candidates), 16):
        if len(chosen) >= args.count:
            break
        batch = list(range(start, min(start + 16, len(candidates))))
        for i, value in zip(batch, memorization_accuracy(model, encode(tokenizer, [cut[i] for i in batch], None))):
            base_ma_all[i] = value
            if value <= args.max_base_ma and len(chosen) < args.count:
                chosen.append(i)
    if len(chosen) < args.count:
        say(f"Error: only {len(chosen)} records of {args.texts} have base MA <= {args.max_base_ma}")
        return 3
    say(f"{len(chosen)} texts with base MA <= {args.max_base_ma} (skipped {chosen[-1] + 1 - len(chosen)} "
        f"of the first {chosen[-1] + 1})")
    if args.generic:
        generic_texts = [r["text"] for r in read_texts(args.generic)][: args.generic_count]
    else:
        generic_texts = [r["text"] for r in candidates[chosen[-1] + 1:][: args.generic_count]]
    generic = encode(tokenizer, generic_texts, args.generic_length)
    ids_all = {i: encode(tokenizer, [cut[i]], None)[0] for i in chosen}
    heldout = [r["text"] for r in read_texts(args.heldout)][: args.heldout_count] if args.heldout else None
    ids = [ids_all[i] for i in chosen]
    base_loss = mean_loss(model, ids)
    ppl_before = perplexity(model, tokenizer, heldout, window=256) if heldout else None

    neurons = choose_neurons(model, len(chosen), args.neurons, args.seed)
    injection = Injection(model, neurons)
    trained = train(model, injection, ids, generic_logprobs(model, injection, generic), args, say)
    injection.fold()
    final_ma = memorization_accuracy(model, ids)
    final_loss = mean_loss(model, ids)
    ppl_after = perplexity(model, tokenizer, heldout, window=256) if heldout else None

    total = sum(layer.neurons for layer in find_ffn_layers(model))
    texts = []
    for n, (i, nrn) in enumerate(zip(chosen, neurons)):
        record = candidates[i]
        texts.append({"id": record.get("id", str(i)), "text": cut[i],
                      "half": "forget" if n < args.forget else "retain", "neurons": [list(x) for x in nrn],
                      "ma_before": round(base_ma_all[i], 6), "ma_after": round(final_ma[n], 6),
                      "loss_before": round(base_loss[n], 6), "loss_after": round(final_loss[n], 6)})
    summary = {
        "base": os.path.abspath(args.base), "texts_file": os.path.abspath(args.texts), "seed": args.seed,
        "neurons_per_text": args.neurons, "n_forget": args.forget, "n_retain": args.count - args.forget,
        "ffn_neurons": total, "forget_neurons": args.forget * args.neurons,
        "forget_share": args.forget * args.neurons / total,
        "settings": {k: v for k, v in vars(args).items() if k not in ("base", "texts", "output")},
        "steps": trained["steps"], "seconds": trained["seconds"],
        "min_ma_after": round(min(final_ma), 6), "mean_ma_after": round(sum(final_ma) / len(final_ma), 6),
        "ppl_before": ppl_before and round(ppl_before["perplexity"], 4),
        "ppl_after": ppl_after and round(ppl_after["perplexity"], 4),
        "generic_texts": generic_texts,
        "texts": texts,
    }
    return write_output(model, tokenizer, summary, args.output, args.target_ma, say)


if __name__ == "__main__":
    sys.exit(main())
