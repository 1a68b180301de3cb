"""`neumuter neighbors`: masked-LM neighbour texts, on tiny BERT-style MLMs made here."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch
from click.testing import CliRunner
from helpers import CORPUS
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

from neumuter_cli import NeumuterError
from neumuter_cli.cli import cli
from neumuter_cli.neighbors import NeighborWriter, load_mlm

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEXTS = [
    "Alice Smith lives at 12 Oak Street and her phone number is 555-0134.",
    "The quick brown fox jumps over the lazy dog.",
    "Bob Jones lives at 7 Elm Road.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "The secret launch code is 7421-alpha-9983, never share it.",
]


def wordpiece_tokenizer(vocab_size: int = 200) -> PreTrainedTokenizerFast:
    """An uncased WordPiece tokenizer like BERT's, trained in milliseconds."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS * 3, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def save_mlm(path, window: int = 64, favourites: tuple[int, ...] = (), seed: int = 0, tokenizer=None):
    """A tiny random BERT MLM. With ``favourites``, the head ignores the text and ranks those
    token ids first, in that order (a deterministic "predict token X" model)."""
    tokenizer = tokenizer or wordpiece_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=window, initializer_range=0.2,
                        tie_word_embeddings=not favourites)
    model = BertForMaskedLM(config).eval()
    if favourites:
        with torch.no_grad():
            decoder = model.cls.predictions.decoder
            decoder.weight.zero_()
            decoder.bias.zero_()
            for rank, token in enumerate(favourites):
                decoder.bias[token] = 10.0 - rank
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    return save_mlm(tmp_path_factory.mktemp("mlm"))


@pytest.fixture(scope="module")
def mlm(mlm_dir):
    return load_mlm(mlm_dir, "cpu")


@pytest.fixture(scope="module")
def small_window_mlm(tmp_path_factory):
    return load_mlm(save_mlm(tmp_path_factory.mktemp("mlm16"), window=16), "cpu")


@pytest.fixture(scope="module")
def constant_mlm(tmp_path_factory):
    """Predicts [MASK] first (banned: special), then a token none of TEXTS holds, whatever the
    text. Returns (model, tokenizer, that token)."""
    tokenizer = wordpiece_tokenizer()
    used = {i for text in TEXTS for i in ids_of(tokenizer, text)}
    target = next(i for i in range(len(SPECIALS), len(tokenizer)) if i not in used)
    mask = tokenizer.mask_token_id
    path = save_mlm(tmp_path_factory.mktemp("const"), window=16, favourites=(mask, target), tokenizer=tokenizer)
    return (*load_mlm(path, "cpu"), target)


def naive_neighbors(model, tokenizer, texts, k, ratio, seed, context=None):
    """The yardstick's algorithm, one MLM call per token per text; for texts longer than the
    window, the window centred on the visited position (clamped to the text)."""
    context = context or model.config.max_position_embeddings - 2
    rng = random.Random(seed)
    banned = torch.tensor(tokenizer.all_special_ids)
    out = []
    for text in texts:
        per_text = []
        for _ in range(k):
            tokens = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))
            n = max(1, int(len(tokens) * ratio))
            for p in sorted(rng.sample(range(len(tokens)), n)):
                start = 0 if len(tokens) <= context else min(max(p - context // 2, 0), len(tokens) - context)
                cur = tokens[start:start + context]
                cur[p - start] = tokenizer.mask_token_id
                ids = [tokenizer.cls_token_id, *cur, tokenizer.sep_token_id]
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([ids])).logits[0, p - start + 1]
                logits[banned] = float("-inf")
                tokens[p] = int(logits.argmax())
            per_text.append(tokens)
        out.append(per_text)
    return out


def ids_of(tokenizer, text):
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))


# ---------------------------------------------------------------- the library

@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_greedy_equals_the_one_call_per_token_yardstick(mlm, ratio):
    model, tokenizer = mlm
    token_ids = [ids_of(tokenizer, t) for t in TEXTS]
    writer = NeighborWriter(model, tokenizer, k=2, ratio=ratio, seed=3, batch_size=3, temperature=0.0)
    fast = writer.rewrite_ids(token_ids)
    assert fast == naive_neighbors(model, tokenizer, TEXTS, k=2, ratio=ratio, seed=3)
    assert fast != [[ids, ids] for ids in token_ids]  # something was rewritten


def test_narrowed_last_layer_is_used_and_agrees_with_the_plain_head_hook(mlm):
    model, tokenizer = mlm
    token_ids = [ids_of(tokenizer, t) for t in TEXTS]
    fast = NeighborWriter(model, tokenizer, k=2, ratio=0.8, seed=1, batch_size=4, temperature=0.0)
    assert fast._fast_layer is not None  # BERT: the last layer runs for the masked rows only
    plain = NeighborWriter(model, tokenizer, k=2, ratio=0.8, seed=1, batch_size=4, temperature=0.0)
    plain._fast_layer = None  # every layer whole, only the vocabulary projection narrowed
    assert fast.rewrite_ids(token_ids) == plain.rewrite_ids(token_ids)


def test_without_the_fast_paths_the_neighbours_are_the_same(mlm):
    """The fallback (NEUMUTER_NO_FASTPATHS=1, an untested transformers) runs the last layer
    whole and writes the same neighbours, sampled ones included."""
    from neumuter_cli import fastpaths

    model, tokenizer = mlm
    token_ids = [ids_of(tokenizer, t) for t in TEXTS]
    options = dict(k=2, ratio=0.8, seed=4, batch_size=3, temperature=1.0, top_k=10)
    fast = NeighborWriter(model, tokenizer, **options)
    assert fast._fast_layer is not None
    with fastpaths.disabled():
        plain = NeighborWriter(model, tokenizer, **options)
    assert plain._fast_layer is None
    assert fast.rewrite_ids(token_ids) == plain.rewrite_ids(token_ids)


def test_a_narrowed_layer_that_fails_its_probe_is_not_used(mlm, monkeypatch):
    from neumuter_cli import fastpaths

    def broken(layer, gather, hidden_states, *args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(fastpaths, "_layer_at_masked", broken)
    model, tokenizer = mlm
    said = []
    writer = NeighborWriter(model, tokenizer, k=1, ratio=1.0, temperature=0.0, progress=said.append)
    assert writer._fast_layer is None
    assert any("runs whole" in line and "RuntimeError: shape mismatch" in line for line in said)
    assert "forward" not in model.base_model.encoder.layer[-1].__dict__   # the patch is undone
    assert writer.rewrite_ids([ids_of(tokenizer, TEXTS[0])]) == \
        naive_neighbors(model, tokenizer, [TEXTS[0]], k=1, ratio=1.0, seed=0)


def test_long_texts_are_rewritten_whole_by_sliding_windows(small_window_mlm):
    model, tokenizer = small_window_mlm
    text = " ".join(TEXTS)
    n = len(ids_of(tokenizer, text))
    assert n > 3 * 16
    writer = NeighborWriter(model, tokenizer, k=1, ratio=1.0, batch_size=2, temperature=0.0)
    fast = writer.rewrite_ids([ids_of(tokenizer, text), ids_of(tokenizer, TEXTS[2])])
    assert len(fast[0][0]) == n
    assert writer.rewrites == n + len(ids_of(tokenizer, TEXTS[2]))
    assert fast == naive_neighbors(model, tokenizer, [text, TEXTS[2]], k=1, ratio=1.0, seed=0)


def test_long_text_every_token_replaced(constant_mlm):
    model, tokenizer, target = constant_mlm
    text = " ".join(TEXTS)
    (out,), = NeighborWriter(model, tokenizer, ratio=1.0, temperature=0.0).rewrite_ids([ids_of(tokenizer, text)])
    assert out == [target] * len(ids_of(tokenizer, text))


def test_ratio_half_rewrites_half_the_positions(constant_mlm):
    model, tokenizer, target = constant_mlm
    original = ids_of(tokenizer, TEXTS[0] + " " + TEXTS[3])
    changed = []
    for seed in (0, 1):
        (out,), = NeighborWriter(model, tokenizer, ratio=0.5, seed=seed, temperature=0.0).rewrite_ids([original])
        assert len(out) == len(original)
        positions = [i for i, (a, b) in enumerate(zip(original, out)) if a != b]
        assert len(positions) == int(len(original) * 0.5)
        assert all(out[i] == target for i in positions)
        changed.append(positions)
    assert changed[0] != changed[1]


def test_special_tokens_are_never_predicted(constant_mlm):
    model, tokenizer, target = constant_mlm  # its first choice is [MASK] everywhere
    [[out]] = NeighborWriter(model, tokenizer, ratio=1.0, temperature=0.0).rewrite_ids([ids_of(tokenizer, "the dog")])
    assert out == [target] * len(ids_of(tokenizer, "the dog"))
    writer = NeighborWriter(model, tokenizer, temperature=5.0, k=3)  # nearly uniform
    for per_text in writer.rewrite_ids([ids_of(tokenizer, t) for t in TEXTS]):
        for neighbour in per_text:
            assert not set(neighbour) & set(tokenizer.all_special_ids)


def test_sampling_gives_distinct_neighbours_and_greedy_identical_ones(mlm):
    model, tokenizer = mlm
    sampled = NeighborWriter(model, tokenizer, k=4, ratio=1.0, temperature=1.0)(TEXTS)
    for per_text in sampled:
        assert len(per_text) == 4 and len(set(per_text)) == 4
    writer = NeighborWriter(model, tokenizer, k=3, ratio=1.0, temperature=0.0)
    greedy = writer(TEXTS)
    assert all(len(set(per_text)) == 1 for per_text in greedy)
    assert writer.rewrites == sum(len(ids_of(tokenizer, t)) for t in TEXTS)  # made once, not 3 times


def test_top_k_one_is_the_argmax(mlm):
    model, tokenizer = mlm
    greedy = NeighborWriter(model, tokenizer, k=2, ratio=0.6, seed=5, temperature=0.0)(TEXTS)
    top1 = NeighborWriter(model, tokenizer, k=2, ratio=0.6, seed=5, temperature=2.0, top_k=1)(TEXTS)
    assert top1 == greedy


def test_seeded_and_independent_of_batch_size_and_grouping(mlm):
    model, tokenizer = mlm
    options = dict(k=3, ratio=0.7, temperature=1.0, top_k=20)
    records = [{"text": t, "id": i} for i, t in enumerate(TEXTS)]
    a = list(NeighborWriter(model, tokenizer, seed=7, batch_size=1, **options).records(records))
    b = list(NeighborWriter(model, tokenizer, seed=7, batch_size=5, **options).records(records, group=2))
    c = list(NeighborWriter(model, tokenizer, seed=8, batch_size=5, **options).records(records))
    assert a == b
    assert [r["neighbors"] for r in a] != [r["neighbors"] for r in c]


def test_bad_options_and_untokenizable_text(mlm):
    model, tokenizer = mlm
    for bad, message in ((dict(k=0), "k must be at least 1"),
                         (dict(ratio=0.0), "ratio (the share of tokens rewritten) must be in (0, 1], not 0.0"),
                         (dict(ratio=1.5), "ratio (the share of tokens rewritten) must be in (0, 1], not 1.5"),
                         (dict(temperature=-1.0), "temperature must be 0 (argmax) or positive, not -1.0"),
                         (dict(top_k=-1), "top_k must be 0 (no limit) or positive"),
                         (dict(batch_size=0), "batch_size must be at least 1")):
        with pytest.raises(NeumuterError) as info:
            NeighborWriter(model, tokenizer, **bad)
        assert str(info.value) == message and info.value.setting == next(iter(bad))
    with pytest.raises(NeumuterError, match="record 2: the text has no token"):
        NeighborWriter(model, tokenizer)(["a dog", "\x00\x01"])


def test_a_causal_lm_is_not_a_masked_lm(tiny_neo_dir):
    with pytest.raises(NeumuterError, match="cannot load the masked LM"):
        load_mlm(tiny_neo_dir, "cpu")


# ---------------------------------------------------------------- the command

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_cli_keeps_keys_and_order_and_adds_k_neighbours(tmp_path, mlm_dir):
    records = [{"id": f"r{i}", "text": t, "meta": {"n": i}, "tags": [i]} for i, t in enumerate(TEXTS)]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(cli, ["neighbors", source, "--mlm", mlm_dir, "-k", "3", "-r", "0.5",
                                      "--temperature", "1", "--batch-size", "4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "neighbors:" in result.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "neighbors"} for r in got] == records
    for record in got:
        assert len(record["neighbors"]) == 3 and all(isinstance(t, str) and t for t in record["neighbors"])
    # the same through stdin/stdout with a different batch size: the same records
    again = CliRunner().invoke(cli, ["neighbors", "--mlm", mlm_dir, "-k", "3", "-r", "0.5", "--temperature", "1",
                                     "--batch-size", "7"], input=open(source).read())
    assert again.exit_code == 0, again.output
    assert [json.loads(line) for line in again.stdout.splitlines()] == got


@pytest.mark.parametrize("content,message", [
    ('{"text": "a dog"}\n{"id": 2}\n', ":2: record has no \"text\""),
    ('{"text": "a dog"}\n{"text": "the fox"\n', ":2: invalid JSON"),
    ("", "no records"),
])
def test_cli_bad_input_fails_cleanly_without_output(tmp_path, mlm_dir, content, message):
    source = tmp_path / "in.jsonl"
    source.write_text(content)
    out = tmp_path / "out" / "nb.jsonl"
    out.parent.mkdir()
    result = CliRunner().invoke(cli, ["neighbors", str(source), "--mlm", mlm_dir, "-o", str(out)])
    assert result.exit_code == 3
    errors = [line for line in result.stderr.splitlines() if "Error" in line]
    assert len(errors) == 1 and errors[0].startswith("Error: ") and message in errors[0]
    assert os.listdir(out.parent) == []


def test_cli_unknown_mlm_fails_cleanly(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "a dog"}])
    out = tmp_path / "nb.jsonl"
    result = CliRunner().invoke(cli, ["neighbors", source, "--mlm", str(tmp_path / "no-such-mlm"), "-o", str(out)])
    assert result.exit_code == 3
    assert "Error: " in result.stderr and "no-such-mlm" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_cli_error_in_a_later_group_leaves_no_file(tmp_path, mlm_dir):
    lines = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 3) + "not json\n"
    source = tmp_path / "in.jsonl"
    source.write_text(lines)
    out = tmp_path / "nb.jsonl"
    result = CliRunner().invoke(cli, ["neighbors", str(source), "--mlm", mlm_dir, "--batch-size", "1", "-o", str(out)])
    assert result.exit_code == 3
    assert f":{len(TEXTS) * 3 + 1}: invalid JSON" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]
