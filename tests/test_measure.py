"""measure: the fast MA / EL_n against a slow transcription of the definitions, thresholds,
perplexity windows, extraction examples and the CLI (formats, --check exit codes, bad input)."""
import json
import math

import pytest
import torch
from click.testing import CliRunner

from helpers import CORPUS, byte_bpe_tokenizer, tiny_config
from neumuter_cli import NeumuterError
from neumuter_cli.cli import cli
from neumuter_cli.measure import (
    encode, extraction_likelihood, extraction_likelihoods, generations, greedy_continuations, is_forgotten,
    mark, measure_records, memorization_accuracy, perplexity, suffix_generations, summarize,
    teacher_forced, thresholds,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")

SECRET = CORPUS[3]                           # the sentence the tiny model memorises
OTHERS = [t for t in CORPUS if t != SECRET]
NOISE = "zq xv kj wq pz qx vk jz"


# ---------------------------------------------------------------- slow reference (the definitions)

@torch.no_grad()
def slow_greedy(model, prefix, new_tokens):
    out, past, x = [], None, torch.tensor([prefix])
    for _ in range(new_tokens):
        o = model(input_ids=x, past_key_values=past, use_cache=True)
        past = o.get("cache", None) or o.get("past_key_values", None)
        nxt = int(o.logits[0, -1].argmax())
        out.append(nxt)
        x = torch.tensor([[nxt]])
    return out


@torch.no_grad()
def slow_ma(model, ids):
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    return (logits.argmax(-1) == torch.tensor(ids[1:])).float().mean().item()


def ngrams(seq, n):
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def slow_generations(model, ids):
    """gen(i) for i = 1..T-1, one generate call per prefix (as the definition reads)."""
    return {i: slow_greedy(model, ids[:i], len(ids) - i) for i in range(1, len(ids))}


def slow_el(ids, gens, n):
    T = len(ids)
    total = 0.0
    for i in range(1, T):
        gen = gens[i]
        lg = ngrams(ids[i:], n)
        if not lg:
            continue
        ls = set(lg)
        total += sum(1 for g in ngrams(gen, n) if g in ls) / len(lg)
    return total / (T - 1 - (n - 1)) if T - n > 0 else None


# ---------------------------------------------------------------- a tiny model that memorised SECRET

@pytest.fixture(scope="module")
def memorizer(tmp_path_factory):
    """A 2-block GPT-Neo trained for a second on one sentence: greedy decoding reproduces it,
    so the reuse path (greedy token == true token) is exercised, and other texts are not."""
    from transformers import AutoModelForCausalLM

    tok = byte_bpe_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt_neo", hidden=48, ffn=96))
    ids = torch.tensor([tok(SECRET).input_ids])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    path = tmp_path_factory.mktemp("memorizer")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok, str(path)


def sequences(model, tok):
    """Token sequences that mix long greedy stretches with divergences, repeated n-grams,
    several lengths (some of n tokens or fewer)."""
    g = torch.Generator().manual_seed(3)
    secret = tok(SECRET).input_ids[:30]
    corrupted = list(secret)
    for k in (5, 11, 12, 19):
        corrupted[k] = int(torch.randint(0, 300, (1,), generator=g))
    own = list(secret[:4]) + slow_greedy(model, list(secret[:4]), 12)   # the model's own output
    own[9] = (own[9] + 1) % 300
    rand = torch.randint(0, 300, (14,), generator=g).tolist()
    return [secret, corrupted, own, rand, secret[:7], rand[:3], [secret[0], secret[1]], secret[6:18]]


@pytest.fixture(scope="module")
def reference(memorizer):
    """The sequences and their generations by the slow definition (computed once)."""
    model, tok, _ = memorizer
    seqs = sequences(model, tok)
    return seqs, [slow_generations(model, ids) for ids in seqs]


def test_fast_ma_and_el_equal_the_definitions(memorizer, reference):
    model, tok, _ = memorizer
    seqs, slow_gens = reference
    assert slow_ma(model, seqs[0]) > 0.9, "the fixture model should have memorised SECRET"
    ns = (1, 2, 3, 10)
    want_el = {n: [slow_el(ids, gens, n) for ids, gens in zip(seqs, slow_gens)] for n in ns}
    want_ma = [slow_ma(model, ids) for ids in seqs]
    for batch_size in (1, 3, 64):
        got = extraction_likelihoods(model, seqs, ns, batch_size=batch_size)
        for n in ns:
            assert got[n] == want_el[n], (batch_size, n)
        # the definition's script takes a float32 mean; measure reports the exact ratio in double
        got_ma = memorization_accuracy(model, seqs, batch_size=batch_size)
        assert [torch.tensor(v, dtype=torch.float32).item() for v in got_ma] == want_ma
    assert extraction_likelihood(model, seqs, n=2) == want_el[2]
    assert want_el[10][4] is None and want_el[10][0] > 0.5 and want_el[1][3] < want_el[1][0]


def test_reuse_identity_gives_the_true_greedy_continuations(memorizer, reference):
    model, tok, _ = memorizer
    seqs, slow_gens = reference
    gens = suffix_generations(model, seqs, batch_size=5)
    assert gens == slow_gens
    reused = 0
    for ids in seqs:
        tf = teacher_forced(model, [ids])[0]
        reused += sum(tf.preds[i - 1] == ids[i] for i in range(1, len(ids)))
    assert reused > 20, "the reuse path must be exercised"


def test_greedy_continuations_rows_of_different_lengths(memorizer):
    model, tok, _ = memorizer
    ids = tok(SECRET).input_ids
    rows = [(ids[:3], 9), (ids[:11], 2), (ids[:1], 0), (ids[:6], 20), (ids[:3], 1), (ids[:40], 2), (ids[:4], 3)]
    want = [slow_greedy(model, list(c), k) for c, k in rows]
    assert greedy_continuations(model, rows, batch_size=4) == want
    assert greedy_continuations(model, rows, batch_size=2) == want


def test_roomy_cache_gives_bit_identical_logits(memorizer):
    """The in-place KV cache (no torch.cat per step) must not change a single bit, also after
    rows are dropped from it."""
    from neumuter_cli.fastpaths import roomy_cache
    from neumuter_cli.measure import _call

    model, tok, _ = memorizer
    ids = torch.tensor([tok(SECRET).input_ids[:20], tok(OTHERS[0]).input_ids[:20]])
    _, plain = _call(model, ids[:, :8], last_only=True)
    _, roomy = _call(model, ids[:, :8], last_only=True)
    roomy = roomy_cache(roomy, 10)                  # too small on purpose: it must grow
    assert type(roomy.layers[0]).__name__ == "RoomyLayer"
    for p in range(8, 20):
        if p == 14:                                  # drop row 0 from both caches
            plain.batch_select_indices(torch.tensor([1]))
            roomy.batch_select_indices(torch.tensor([1]))
            ids = ids[1:]
        a, plain = _call(model, ids[:, p:p + 1], cache=plain, last_only=True)
        b, roomy = _call(model, ids[:, p:p + 1], cache=roomy, last_only=True)
        assert torch.equal(a, b), p


def test_without_the_fast_paths_the_generations_are_the_same(memorizer, reference):
    """The fallback (transformers' own cache, NEUMUTER_NO_FASTPATHS=1 or an untested
    transformers) gives the same greedy continuations and EL_n, token for token."""
    from neumuter_cli import fastpaths
    from neumuter_cli.measure import _call

    model, _, _ = memorizer
    seqs, _ = reference
    fast = suffix_generations(model, seqs, batch_size=3)
    fast_el = extraction_likelihoods(model, seqs, (2, 5), batch_size=3)
    with fastpaths.disabled():
        _, cache = _call(model, torch.tensor([seqs[0][:4]]), last_only=True)
        assert fastpaths.roomy_cache(cache, 30) is cache
        assert type(cache.layers[0]).__name__ == "DynamicLayer"   # the plain path really runs
        assert suffix_generations(model, seqs, batch_size=3) == fast
        assert extraction_likelihoods(model, seqs, (2, 5), batch_size=3) == fast_el


def test_teacher_forced_padding_and_loss(memorizer):
    model, tok, _ = memorizer
    seqs = encode(tok, [SECRET, OTHERS[0], "ab"], None)
    batched = teacher_forced(model, seqs, batch_size=8)
    for ids, tf in zip(seqs, batched):
        alone = teacher_forced(model, [ids], batch_size=1)[0]
        assert tf.preds == alone.preds
        assert tf.nll == pytest.approx(alone.nll, abs=1e-5)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
        assert tf.loss == pytest.approx(ref, abs=1e-5)
    with pytest.raises(NeumuterError, match="at least 2"):
        teacher_forced(model, [[5]])


def test_measure_records_and_thresholds(memorizer):
    model, tok, _ = memorizer
    results = measure_records(model, tok, [SECRET, NOISE], el_ns=(5, 10), max_length=40)
    assert [r["tokens"] for r in results] == [min(40, len(tok(t).input_ids)) for t in (SECRET, NOISE)]
    assert set(results[0]) == {"tokens", "ma", "el_5", "el_10", "loss"}
    assert results[0]["ma"] > 0.9 > 0.2 > results[1]["ma"]
    reference = measure_records(model, tok, OTHERS, el_ns=(5, 10))
    limits = thresholds(reference, (5, 10))
    assert limits["ma"] == pytest.approx(sum(r["ma"] for r in reference) / len(reference))
    assert limits["records"] == len(OTHERS)
    mark(results, limits, (5, 10))
    assert [r["forgotten"] for r in results] == [False, True]
    assert results[0]["mia_distance"] == pytest.approx(abs(results[0]["loss"] - limits["loss"]))
    summary = summarize(results, (5, 10), limits)
    assert summary["forgotten"] == 1 and summary["records"] == 2
    assert summary["mia_within_0.5"] == sum(r["mia_distance"] <= 0.5 for r in results) / 2


def test_is_forgotten_rule():
    limits = {"ma": 0.2, "el_10": 0.05, "loss": 3.0}
    assert is_forgotten({"ma": 0.2, "el_10": 0.05}, limits, (10,))
    assert not is_forgotten({"ma": 0.21, "el_10": 0.0}, limits, (10,))
    assert not is_forgotten({"ma": 0.0, "el_10": 0.06}, limits, (10,))
    assert is_forgotten({"ma": 0.1, "el_10": None}, limits, (10,)), "undefined EL (short text): MA decides"


def test_perplexity_windows(memorizer):
    model, tok, _ = memorizer
    texts = [SECRET * 3, OTHERS[0]]
    ids = encode(tok, texts, None)
    # one window covering each whole text = exp(mean token loss over all positions)
    tfs = teacher_forced(model, ids)
    want = math.exp(sum(sum(tf.nll) for tf in tfs) / sum(len(tf.nll) for tf in tfs))
    whole = perplexity(model, tok, texts, window=200)
    assert whole["perplexity"] == pytest.approx(want, rel=1e-5)
    assert whole["tokens"] == sum(len(x) - 1 for x in ids)
    # non-overlapping windows of 16: every window scores all its tokens but the first
    cut = perplexity(model, tok, texts, window=16)
    assert cut["tokens"] == sum(sum(min(16, len(x) - b) - 1 for b in range(0, len(x), 16)) for x in ids)
    # overlapping windows score every token but the first of each text once, with more context
    slide = perplexity(model, tok, texts, window=16, stride=4)
    assert slide["tokens"] == whole["tokens"]
    nll = 0.0
    for x in ids:   # token t scored with the window of 16 that ends at the first stride step covering t
        for t in range(1, len(x)):
            begin = 0
            while begin + 16 < t + 1:
                begin += 4
            begin = max(0, min(begin, t))
            nll += teacher_forced(model, [x[begin:t + 1]])[0].nll[-1]
    assert slide["nll"] == pytest.approx(nll / slide["tokens"], rel=1e-5)
    assert slide["perplexity"] != pytest.approx(cut["perplexity"], rel=1e-6)
    with pytest.raises(NeumuterError, match="stride"):
        perplexity(model, tok, texts, window=16, stride=17)
    with pytest.raises(NeumuterError, match="longer than the model's context"):
        perplexity(model, tok, [SECRET * 10], window=300)   # the tiny model has 256 positions
    with pytest.raises(NeumuterError, match="longer than the model's context"):
        greedy_continuations(model, [(ids[0][:10], 250)])


def test_generations_mark_the_divergence(memorizer):
    model, tok, _ = memorizer
    out = generations(model, tok, [SECRET, NOISE, "ab"], prefix_tokens=5, new_tokens=12)
    assert out[2] is None
    first = out[0]
    ids = tok(SECRET).input_ids
    gen = slow_greedy(model, ids[:5], 12)
    assert first["generated"] == tok.decode(gen)
    assert first["true"] == tok.decode(ids[5:17])
    k = first["matching"]
    assert gen[:k] == ids[5:5 + k] and (k == 12 or gen[k] != ids[5 + k])
    assert first["same"] + first["different"] == first["generated"] or k in (0, 12)


# ---------------------------------------------------------------- CLI

def write_jsonl(path, texts, **extra):
    with open(path, "w", encoding="utf-8") as f:
        for k, text in enumerate(texts):
            f.write(json.dumps({"id": f"r{k}", "text": text, **extra}) + "\n")
    return str(path)


def test_cli_jsonl_keeps_keys_and_check_exit_codes(memorizer, tmp_path):
    _, _, path = memorizer
    forget = write_jsonl(tmp_path / "forget.jsonl", [SECRET], source="x")
    noise = write_jsonl(tmp_path / "noise.jsonl", [NOISE])
    ref = write_jsonl(tmp_path / "ref.jsonl", OTHERS)
    runner = CliRunner()
    result = runner.invoke(cli, ["measure", forget, "-m", path, "--reference", ref, "--el-n", "5,10",
                                 "--check", "--format", "jsonl"])
    assert result.exit_code == 1, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["id"] == "r0" and rows[0]["source"] == "x" and rows[0]["text"] == SECRET
    assert rows[0]["forgotten"] is False and rows[0]["ma"] > 0.9 and "el_5" in rows[0] and "el_10" in rows[0]
    assert "not forgotten" in result.stderr and "r0" in result.stderr

    result = runner.invoke(cli, ["measure", noise, "-m", path, "--reference", ref, "--check", "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["forgotten"] is True


def test_cli_json_table_generations_and_ppl(memorizer, tmp_path):
    _, _, path = memorizer
    forget = write_jsonl(tmp_path / "forget.jsonl", [SECRET, NOISE])
    ref = write_jsonl(tmp_path / "ref.jsonl", OTHERS)
    runner = CliRunner()
    result = runner.invoke(cli, ["measure", forget, "-m", path, "--reference", ref, "--format", "json",
                                 "--ppl", ref, "--ppl-window", "8", "--generations", "1",
                                 "--prefix-tokens", "4", "--new-tokens", "6"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["id"] for r in data["records"]] == ["r0", "r1"]
    assert data["summary"]["forgotten"] == 1
    assert data["summary"]["perplexity"]["window"] == 8 and data["summary"]["perplexity"]["perplexity"] > 1
    assert data["records"][0]["generation"]["prefix"] and "generation" not in data["records"][1]

    # perplexity alone: nothing on stdin
    result = runner.invoke(cli, ["measure", "-m", path, "--ppl", ref, "--ppl-window", "8", "--format", "json"],
                           input="")
    assert result.exit_code == 0, result.output
    alone = json.loads(result.stdout)
    assert alone["records"] == [] and alone["summary"]["perplexity"] == data["summary"]["perplexity"]
    result = runner.invoke(cli, ["measure", "-m", path, "--ppl", ref, "--ppl-window", "8"], input="")
    assert json.loads(result.stdout)["summary"]["perplexity"] == data["summary"]["perplexity"]

    out = tmp_path / "out.txt"
    result = runner.invoke(cli, ["measure", forget, "-m", path, "--format", "table", "-o", str(out),
                                 "--generations", "1", "--prefix-tokens", "4", "--new-tokens", "6"])
    assert result.exit_code == 0, result.output
    table = out.read_text()
    assert "r0" in table and "MA" in table and "EL_10" in table and "leading tokens match" in table

    # piped input, no EL, summary on stderr
    result = runner.invoke(cli, ["measure", "-m", path, "--el-n", "0", "--format", "jsonl"],
                           input=json.dumps({"text": SECRET}) + "\n")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert "el_10" not in row and row["ma"] > 0.9
    assert "MA" in result.stderr


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": \n', "2: invalid JSON"),
    ('{"id": 1}\n', 'no "text"'),
    ("", "no records"),
])
def test_cli_bad_input(memorizer, tmp_path, content, message):
    _, _, path = memorizer
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(cli, ["measure", str(bad), "-m", path, "-o", str(out)])
    assert result.exit_code == 3
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_cli_thresholds_file_replaces_the_reference(memorizer, tmp_path):
    _, _, path = memorizer
    forget = write_jsonl(tmp_path / "forget.jsonl", [SECRET, NOISE])
    ref = write_jsonl(tmp_path / "ref.jsonl", OTHERS)
    saved = tmp_path / "ref.json"
    runner = CliRunner()
    result = runner.invoke(cli, ["measure", ref, "-m", path, "--format", "json", "-o", str(saved)])
    assert result.exit_code == 0, result.output
    direct = runner.invoke(cli, ["measure", forget, "-m", path, "--reference", ref, "--format", "json"])
    cached = runner.invoke(cli, ["measure", forget, "-m", path, "--thresholds", str(saved), "--format", "json"])
    assert direct.exit_code == cached.exit_code == 0, cached.output
    want, got = json.loads(direct.stdout), json.loads(cached.stdout)
    assert got["records"] == want["records"]
    assert got["summary"]["thresholds"] == want["summary"]["thresholds"]
    # a run made with --reference carries its thresholds too
    again = tmp_path / "again.json"
    again.write_text(direct.stdout)
    result = runner.invoke(cli, ["measure", forget, "-m", path, "--thresholds", str(again), "--check"])
    assert result.exit_code == 1 and "1 of 2 records are not forgotten" in result.stderr
    # missing EL size, not JSON
    result = runner.invoke(cli, ["measure", forget, "-m", path, "--thresholds", str(saved), "--el-n", "5"])
    assert result.exit_code == 3 and "el_5" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    result = runner.invoke(cli, ["measure", forget, "-m", path, "--thresholds", str(bad)])
    assert result.exit_code == 3 and "not a JSON file" in result.output


def test_cli_usage_errors(memorizer, tmp_path):
    _, _, path = memorizer
    forget = write_jsonl(tmp_path / "f.jsonl", [SECRET])
    runner = CliRunner()
    result = runner.invoke(cli, ["measure", forget, "-m", path, "--check"])
    assert result.exit_code == 2 and result.stderr.splitlines()[-1] == (
        "Error: --check needs --reference, --thresholds, --reference-model or --reference-scores (the verdicts "
        "come from it)")
    result = runner.invoke(cli, ["measure", forget, "-m", path, "--reference", forget, "--thresholds", forget])
    assert result.exit_code == 2 and result.stderr.splitlines()[-1] == "Error: give --reference or --thresholds, not both"
    result = runner.invoke(cli, ["measure", forget, "-m", path, "--el-n", "ten"])
    assert result.exit_code == 2 and result.stderr.splitlines()[-1] == (
        "Error: Invalid value for '--el-n': 'ten' is not an integer (use e.g. 10 or 5,10)")
    assert "loading" not in result.stderr
    short = write_jsonl(tmp_path / "s.jsonl", ["a"])
    result = runner.invoke(cli, ["measure", short, "-m", path])
    assert result.exit_code == 3 and "at least 2" in result.output
