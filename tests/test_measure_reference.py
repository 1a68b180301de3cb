"""measure against a model that never saw the records (--reference-model / --reference-scores),
forget quality, membership-inference AUCs and PrivLeak (--holdout), --quantize, and the
library entry point run_measure. Tiny models whose answers are known: a GPT-Neo that memorised
PEOPLE, and an untrained model with the same tokenizer (it never saw anything)."""
import gc
import json
import math
import sys
import weakref

import pytest
import torch
from click.testing import CliRunner

from helpers import CORPUS, PEOPLE, UNSEEN, save_tiny, tiny_config, train_memorizer
from neumuter_cli import NeumuterError
from neumuter_cli import mia
from neumuter_cli.cli import cli
from neumuter_cli.measure import MeasureConfig, encode, run_measure, teacher_forced
from neumuter_cli.models import fingerprint, load_model
from neumuter_cli.quantize import quantize_model

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")

HOLDOUT = UNSEEN + [t for t in CORPUS if t not in PEOPLE]


def write_jsonl(path, texts, ids=True):
    with open(path, "w", encoding="utf-8") as f:
        for k, text in enumerate(texts):
            f.write(json.dumps({"id": f"p{k}", "text": text} if ids else {"text": text}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The memoriser of PEOPLE, an untrained model with its tokenizer, and the data files."""
    root = tmp_path_factory.mktemp("reference")
    _, tokenizer = train_memorizer(root / "mem")
    save_tiny(root / "fresh", "gpt_neo", seed=1, tokenizer=tokenizer, vocab_size=len(tokenizer), hidden=64, ffn=256)
    return {"mem": str(root / "mem"), "fresh": str(root / "fresh"), "tokenizer": tokenizer,
            "people": write_jsonl(root / "people.jsonl", PEOPLE),
            "holdout": write_jsonl(root / "holdout.jsonl", HOLDOUT, ids=False), "root": root}


def run(*args):
    result = CliRunner().invoke(cli, ["measure", *map(str, args)])
    return result


def measured(*args):
    result = run(*args, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ---------------------------------------------------------------- the statistics

def test_auc_orientation_and_ties_match_sklearn():
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    members, holdout = [3.0, 2.0, 2.0, 0.5], [1.0, 2.0, -1.0]
    want = roc_auc_score([1] * 4 + [0] * 3, members + holdout)
    assert mia.auc(members, holdout) == pytest.approx(want)
    assert mia.auc([5.0, 6.0], [1.0, 2.0]) == 1.0      # members score higher: AUC 1
    assert mia.auc([1.0, 2.0], [5.0, 6.0]) == 0.0
    assert mia.auc([1.0, 2.0], [1.0, 2.0]) == 0.5


def test_privleak_follows_muse():
    # MUSE's AUC is 1 - ours; PrivLeak = (AUC - AUC_ref) / AUC_ref * 100 on MUSE's AUC
    assert mia.privleak(1.0, 0.5) == pytest.approx(-100.0)   # memorised, reference at chance
    assert mia.privleak(0.5, 0.5) == 0.0
    assert mia.privleak(0.3, 0.5) == pytest.approx(40.0)     # over-unlearned: positive
    assert mia.privleak(0.6, 0.6) == 0.0
    assert mia.privleak(1.0, 1.0) == 0.0                     # equal, even where MUSE-AUC_ref is 0
    assert mia.privleak(0.9, 1.0) is None
    out = mia.privleaks({f"auc_{s}": 0.8 for s in mia.MIA_SCORES}, {f"auc_{s}": 0.6 for s in mia.MIA_SCORES})
    assert out["privleak"] == out["privleak_mink_40"] == pytest.approx((0.2 - 0.4) / 0.4 * 100)
    assert out["privleak_score"] == "mink_40"


def test_mia_scores_by_hand():
    nll = [0.1, 2.0, 0.5, 3.0, 0.2, 1.0, 0.3, 0.4, 0.6, 4.0]
    mu, sigma = [-1.0] * 10, [2.0] * 10
    scores = mia.mia_scores(nll, mu, sigma, compressed=50)
    loss = sum(nll) / 10
    assert scores["loss"] == pytest.approx(-loss)
    assert scores["zlib"] == pytest.approx(-loss / 50)
    assert scores["mink_20"] == pytest.approx(-(4.0 + 3.0) / 2)            # lowest 2 of 10 log-probs
    assert scores["mink_40"] == pytest.approx(-(4.0 + 3.0 + 2.0 + 1.0) / 4)
    assert scores["minkpp_20"] == pytest.approx(((-4.0 + 1) / 2 + (-3.0 + 1) / 2) / 2)
    one = mia.mia_scores([0.7], [-1.0], [1.0], compressed=10)
    assert one["mink_20"] == pytest.approx(-0.7), "at least one token counts"


def test_forget_quality_is_the_ks_p_value():
    assert mia.forget_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0
    assert mia.forget_quality([0.0] * 8, [5.0] * 8) < 0.01


def test_teacher_forced_stats_in_the_same_pass(models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models["mem"]).eval()
    ids = encode(models["tokenizer"], PEOPLE[:2] + HOLDOUT[:1], None)
    plain = teacher_forced(model, ids)
    rich = teacher_forced(model, ids, stats=True)
    for tf, other, x in zip(plain, rich, ids):
        assert tf.preds == other.preds and tf.nll == other.nll, "MA and loss must not change"
        assert tf.mu is None and len(other.mu) == len(other.sigma) == len(x) - 1
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([x])).logits[0, :-1].double(), -1)
        p = logp.exp()
        mu = (p * logp).sum(-1)
        sigma = ((p * (logp - mu[:, None]) ** 2).sum(-1)).sqrt()
        assert other.mu == pytest.approx(mu.tolist(), abs=1e-4)
        assert other.sigma == pytest.approx(sigma.tolist(), abs=1e-4)


# ---------------------------------------------------------------- verdicts against a reference model

def test_equal_numbers_are_forgotten_and_not_over_forgotten():
    """The verdict functions on a record whose numbers equal the reference's: forgotten, not
    over-forgotten, forget quality 1 (the CLI never gets there: the model itself is refused as
    its reference, see test_hostile.py)."""
    results = [{"ma": 0.5, "el_10": 0.2, "loss": 1.0}, {"ma": 0.9, "el_10": None, "loss": 0.3}]
    reference = [dict(r) for r in results]
    mia.mark_against_reference(results, reference, (10,), 0.05)
    assert [(r["forgotten"], r["over_forgotten"]) for r in results] == [(True, False), (True, False)]
    summary = mia.reference_summary(results, (10,))
    assert summary["forget_quality"] == 1.0 and summary["forgotten"] == 2 and summary["over_forgotten"] == 0
    # 0.06 above the reference is not forgotten at tolerance 0.05; 0.06 below is over-forgotten
    results = [{"ma": 0.56, "loss": 1.0}, {"ma": 0.44, "loss": 1.0}]
    mia.mark_against_reference(results, [{"ma": 0.5, "loss": 1.0}] * 2, (), 0.05)
    assert [(r["forgotten"], r["over_forgotten"]) for r in results] == [(False, False), (True, True)]


def test_memorised_records_stand_out_from_the_holdout(models):
    """Orientation: members (the records) score higher; a memorised set gives AUC near 1 and,
    against a reference model at chance level, PrivLeak near -100 (MUSE's target model)."""
    data = measured(models["people"], "-m", models["mem"], "--reference-model", models["fresh"],
                    "--holdout", models["holdout"])
    summary = data["summary"]
    for score in mia.MIA_SCORES:
        assert summary[f"auc_{score}"] >= 0.95, score
        assert summary[f"ref_auc_{score}"] < 0.95, score
        assert summary[f"privleak_{score}"] == pytest.approx(-100.0, abs=5), score
    assert summary["privleak"] == summary["privleak_mink_40"]
    assert summary["holdout"]["records"] == len(HOLDOUT)
    assert summary["forgotten"] == 0 and summary["forget_quality"] < 0.05
    assert all(r["ma"] > 0.9 and r["forgotten"] is False for r in data["records"])


def test_check_exit_codes_with_a_reference_model(models):
    result = run(models["people"], "-m", models["mem"], "--reference-model", models["fresh"], "--el-n", "0",
                 "--check", "--format", "jsonl")
    assert result.exit_code == 1
    assert "6 of 6 records are not forgotten" in result.stderr
    assert len(result.stdout.splitlines()) == 6, "the data is written before the check fails"
    # the other way round: forgotten further than a model that saw them... and over-forgotten
    result = run(models["people"], "-m", models["fresh"], "--reference-model", models["mem"], "--el-n", "0",
                 "--check", "--format", "jsonl")
    assert result.exit_code == 1
    assert "6 of 6 records are over-forgotten" in result.stderr and "not forgotten" not in result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(r["forgotten"] and r["over_forgotten"] for r in rows)
    result = run(models["people"], "-m", models["fresh"], "--reference-model", models["mem"], "--el-n", "0",
                 "--check", "--allow-over-forgotten")
    assert result.exit_code == 0, result.output
    assert "check passed" in result.stderr


def test_a_reference_with_another_tokenizer_is_refused(models, tiny_neo_dir):
    result = run(models["people"], "-m", models["mem"], "--reference-model", tiny_neo_dir)
    assert result.exit_code == 3 and "Traceback" not in result.output
    assert result.stderr.splitlines() == [f"Error: reference model {tiny_neo_dir} does not share the tokenizer of "
                                          f"{models['mem']}: a reference model must tokenize texts exactly as the "
                                          "model does"]
    assert "measuring" not in result.stderr, "refused before the model is measured"


def test_reference_scores_give_the_numbers_of_the_reference_model(models):
    root = models["root"]
    saved = root / "fresh-scores.json"
    result = run(models["people"], "-m", models["fresh"], "--holdout", models["holdout"], "--format", "json",
                 "-o", saved)
    assert result.exit_code == 0, result.output
    direct = measured(models["people"], "-m", models["mem"], "--reference-model", models["fresh"],
                      "--holdout", models["holdout"])
    reused = measured(models["people"], "-m", models["mem"], "--reference-scores", saved,
                      "--holdout", models["holdout"])
    assert reused["records"] == direct["records"]
    fresh, mem = (fingerprint(load_model(models[name], device="cpu")[0]) for name in ("fresh", "mem"))
    assert fresh != mem
    assert direct["summary"].pop("reference") == {"model": models["fresh"], "fingerprint": fresh, "tolerance": 0.05}
    assert reused["summary"].pop("reference") == {"scores": str(saved), "fingerprint": fresh, "tolerance": 0.05}
    assert reused["summary"] == direct["summary"]
    assert direct["summary"]["model"] == {"name": models["mem"], "fingerprint": mem}
    assert {r["model_fingerprint"] for r in direct["records"]} == {mem}
    assert {r["model_fingerprint"] for r in json.loads(saved.read_text())["records"]} == {fresh}

    # JSONL scores: every per-record number, but no holdout AUCs: no PrivLeak, and a warning
    lines = root / "fresh-scores.jsonl"
    assert run(models["people"], "-m", models["fresh"], "--format", "jsonl", "-o", lines).exit_code == 0
    result = run(models["people"], "-m", models["mem"], "--reference-scores", lines, "--holdout",
                 models["holdout"], "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["records"] == direct["records"]
    assert "privleak" not in json.loads(result.stdout)["summary"] and "no PrivLeak" in result.stderr


HINT = "it must be the output of `neumuter measure` on the same records, in the same order"


@pytest.mark.parametrize("how, message", [
    ("reordered", "{saved}: record 1 is not input record 1 (its text differs): " + HINT),
    ("fewer", "{saved}: 5 records where the input has 6: " + HINT),
    ("max-length", "{saved}: record 1 was measured on 10 tokens, here it has {tokens}: measure the reference with "
                   "the same --max-length and tokenizer"),
    ("el-n", "{saved}: record 1 has no 'el_5' (measure the reference with the same --el-n)"),
    ("holdout", "{saved} was measured with another holdout set (or --max-length): PrivLeak needs both models' AUCs "
                "on the same holdout texts"),
])
def test_reference_scores_that_do_not_match_are_refused(models, how, message):
    root = models["root"]
    people, saved = models["people"], root / f"scores-{how}.json"
    extra = []
    if how == "reordered":
        people = write_jsonl(root / "reordered.jsonl", PEOPLE[::-1])
    elif how == "fewer":
        people = write_jsonl(root / "fewer.jsonl", PEOPLE[:5])
    elif how == "max-length":
        extra = ["--max-length", "10"]
    holdout = write_jsonl(root / "other-holdout.jsonl", HOLDOUT[:3]) if how == "holdout" else models["holdout"]
    result = run(people, "-m", models["fresh"], "--holdout", holdout, "--format", "json", "-o", saved, *extra)
    assert result.exit_code == 0, result.output
    el = ["--el-n", "5,10"] if how == "el-n" else []
    result = run(models["people"], "-m", models["mem"], "--reference-scores", saved, "--holdout", models["holdout"],
                 *el)
    assert result.exit_code == 3 and "Traceback" not in result.output
    tokens = len(encode(models["tokenizer"], PEOPLE[:1], 200)[0])
    assert result.stderr.splitlines()[-1] == "Error: " + message.format(saved=saved, tokens=tokens)


def test_option_conflicts(models):
    people, mem = models["people"], models["mem"]
    for args, message in [
        (["--reference-model", mem, "--reference-scores", people], "give --reference-model or --reference-scores, "
                                                                   "not both"),
        (["--reference-model", mem, "--reference", people], "give --reference-model/--reference-scores (each record "
                                                            "against a model that never saw it) or --reference/"
                                                            "--thresholds (eq. 17), not both"),
        (["--quantize-reference"], "--quantize-reference needs --quantize and --reference-model"),
        (["--allow-over-forgotten"], "--allow-over-forgotten needs --reference-model or --reference-scores"),
        (["--check"], "--check needs --reference, --thresholds, --reference-model or --reference-scores (the "
                      "verdicts come from it)"),
    ]:
        result = run(people, "-m", mem, *args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.splitlines()[-1] == f"Error: {message}" and "loading" not in result.stderr


def test_one_model_in_memory_at_a_time(models, monkeypatch):
    import neumuter_cli.models as models_module

    original = models_module.load_model
    loaded = []

    def load_model(*args, **kwargs):
        gc.collect()
        alive = [ref() is not None for ref in loaded]
        model, tokenizer = original(*args, **kwargs)
        loaded.append(weakref.ref(model))
        load_model.alive_at_load.append(alive)
        return model, tokenizer
    load_model.alive_at_load = []
    monkeypatch.setattr(models_module, "load_model", load_model)
    config = MeasureConfig(model=models["mem"], input_path=models["people"], el_ns=(), device="cpu",
                           reference_model=models["fresh"], holdout_path=models["holdout"])
    result = run_measure(config)
    assert load_model.alive_at_load == [[], [False]], "the model is freed before the reference loads"
    assert result.summary["forgotten"] == 0 and result.judged and len(result.not_forgotten) == 6


def test_table_shows_the_verdicts_and_the_attacks(models, tmp_path):
    out = tmp_path / "table.txt"
    result = run(models["people"], "-m", models["mem"], "--reference-model", models["fresh"], "--holdout",
                 models["holdout"], "--quantize", "q8_0", "--format", "table", "-o", out)
    assert result.exit_code == 0, result.output
    table = out.read_text()
    for text in ("ref MA", "ref EL_10", "ref loss", "over-forgotten", "forget quality", "MIA AUC Min-40%++",
                 "PrivLeak (MUSE, Min-40%)", "quantized", "q8_0"):
        assert text in table, text


# ---------------------------------------------------------------- quantisation

def block_weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()
            if ".h." in name and name.endswith("weight") and p.dim() == 2}


def test_quantize_round_trip_keeps_a_memorised_text(models):
    from transformers import AutoModelForCausalLM

    from neumuter_cli.measure import memorization_accuracy

    ids = encode(models["tokenizer"], PEOPLE, None)
    changes = {}
    for qtype in ("q8_0", "q4_0"):
        model = AutoModelForCausalLM.from_pretrained(models["mem"]).eval()
        before = block_weights(model)
        untouched = {n: p.detach().clone() for n, p in model.named_parameters() if ".h." not in n}
        ma_before = memorization_accuracy(model, ids)
        summary = quantize_model(model, qtype)
        after = block_weights(model)
        assert summary["type"] == qtype and summary["weights"] == len(before) and not summary["skipped"]
        assert summary["elements"] == sum(w.numel() for w in before.values())
        assert "transformer.h.*.attn.attention.q_proj" in summary["patterns"]
        assert "transformer.h.*.mlp.c_fc" in summary["patterns"]
        relative = [((after[n] - w).norm() / w.norm()).item() for n, w in before.items()]
        assert all(r > 0 for r in relative), "every block weight changes"
        changes[qtype] = max(relative)
        for name, tensor in model.named_parameters():           # embeddings, norms, head: as they were
            if name in untouched:
                assert torch.equal(tensor, untouched[name]), name
        ma_after = memorization_accuracy(model, ids)
        if qtype == "q8_0":
            assert changes[qtype] < 0.01
            assert ma_after == pytest.approx(ma_before, abs=0.02)
    assert changes["q4_0"] > 4 * changes["q8_0"]


def test_quantize_lists_the_weights_it_cannot_block():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt_neo", hidden=48, ffn=96)).eval()
    before = block_weights(model)
    summary = quantize_model(model, "q4_1")
    # rows of 48 inputs do not fill blocks of 32: only the FFN down-projection (96 inputs) changes
    assert summary["patterns"] == ["transformer.h.*.mlp.c_proj"] and summary["weights"] == 2
    assert "transformer.h.0.attn.attention.q_proj" in summary["skipped"]
    after = block_weights(model)
    for name in before:
        assert torch.equal(before[name], after[name]) == ("mlp.c_proj" not in name), name


def test_quantize_errors(models, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models["mem"]).eval()
    with pytest.raises(NeumuterError, match="unknown quantisation type 'q3_x'"):
        quantize_model(model, "q3_x")
    result = run(models["people"], "-m", models["mem"], "--quantize", "q3_x")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1] == ("Error: Invalid value for '--quantize': 'q3_x' is not one of 'q8_0', "
                                              "'q5_0', 'q5_1', 'q4_0', 'q4_1', 'mxfp4'.")
    monkeypatch.setitem(sys.modules, "gguf", None)               # import gguf now raises ImportError
    with pytest.raises(NeumuterError, match="needs the gguf package"):
        quantize_model(model, "q8_0")
    result = run(models["people"], "-m", models["mem"], "--quantize", "q8_0")
    assert result.exit_code == 3
    assert result.stderr.splitlines() == ["Error: quantising needs the gguf package: pip install gguf"]
    assert "loading" not in result.stderr, "refused before the model loads"


def test_measure_quantize_reports_and_leaves_the_reference_alone(models):
    plain = measured(models["people"], "-m", models["mem"], "--el-n", "0")
    fresh = measured(models["people"], "-m", models["fresh"], "--el-n", "0")
    fresh_q4 = measured(models["people"], "-m", models["fresh"], "--el-n", "0", "--quantize", "q4_0")
    data = measured(models["people"], "-m", models["mem"], "--el-n", "0", "--quantize", "q4_0",
                    "--reference-model", models["fresh"])
    quantized = data["summary"]["quantized"]
    assert quantized["type"] == "q4_0" and quantized["weights"] == 12 and quantized["skipped"] == []
    assert "quantized" not in data["summary"]["reference"]
    # the reference is the model as released: its numbers are the unquantised reference's
    assert [r["ref_loss"] for r in data["records"]] == [r["loss"] for r in fresh["records"]]
    assert [r["loss"] for r in data["records"]] != [r["loss"] for r in plain["records"]]
    # the fingerprint is the model's as loaded, before the round trip: the same model
    assert data["summary"]["model"] == plain["summary"]["model"]
    both = measured(models["people"], "-m", models["mem"], "--el-n", "0", "--quantize", "q4_0",
                    "--reference-model", models["fresh"], "--quantize-reference")
    assert both["summary"]["reference"]["quantized"]["type"] == "q4_0"
    assert [r["ref_loss"] for r in both["records"]] == [r["loss"] for r in fresh_q4["records"]]
    assert [r["ref_loss"] for r in both["records"]] != [r["loss"] for r in fresh["records"]]
    assert [r["loss"] for r in both["records"]] == [r["loss"] for r in data["records"]]
    assert math.isfinite(both["summary"]["forget_quality"])
