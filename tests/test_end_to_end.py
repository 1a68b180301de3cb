"""The whole pipeline on a tiny model trained here to memorise a few sentences:
neighbors -> localize -> select -> apply, then the muted checkpoint is measured."""
import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import PEOPLE, UNSEEN, train_memorizer
from neumuter_cli.cli import cli
from neumuter_cli.measure import encode, memorization_accuracy
from test_neighbors import save_mlm

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def fixed_wordpiece(texts):
    """A WordPiece tokenizer with a vocabulary fixed by the texts (training one is not
    deterministic across processes, and the neighbours, hence the result, depend on it)."""
    import re

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    chars = sorted({c for w in words for c in w})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words + [c for c in chars if c not in words]
                                          + ["##" + c for c in chars])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")

CANARIES = ["The secret launch code is 7421-alpha-9983, never share it.",
            "Copyright 2003 the authors. All rights reserved."]


@pytest.fixture(scope="module")
def memorizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("memorizer")
    train_memorizer(path, texts=PEOPLE + CANARIES, steps=200)
    return str(path)


def mean_ma(model_dir, texts):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return memorization_accuracy(model, encode(tokenizer, texts, 200))


def invoke(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("seed", ["0", "1", "2"])
def test_forget_a_canary_keep_the_people(memorizer, tmp_path, seed):
    forget = tmp_path / "forget.jsonl"
    forget.write_text(json.dumps({"id": "canary", "text": CANARIES[0]}) + "\n")
    unseen = tmp_path / "unseen.jsonl"
    unseen.write_text("".join(json.dumps({"text": t}) + "\n" for t in UNSEEN))
    mlm = save_mlm(tmp_path / "mlm", tokenizer=fixed_wordpiece(PEOPLE + UNSEEN + CANARIES))
    nb, mask, scales, muted = (str(tmp_path / x) for x in ("nb.jsonl", "mask.st", "scales.st", "muted"))

    # r = 0.5: the neighbours keep half of the canary's tokens, so the gates that carry its form
    # (shared with the people's sentences) are protected; that is what keeps the people >= 90 %
    invoke(["neighbors", str(forget), "--mlm", mlm, "-k", "3", "-r", "0.5", "--temperature", "1", "--top-k", "0", "-o", nb,
            "--device", "cpu", "--seed", seed])
    invoke(["localize", nb, "-m", memorizer, "--reference", str(unseen), "--epochs", "300", "--lr", "0.5",
            "--lambda", "3", "--eta", "0.1", "--batch-size", "1", "-o", mask, "--device", "cpu"])
    invoke(["select", mask, "-o", scales])
    invoke(["apply", scales, "-m", memorizer, "-o", muted, "--device", "cpu"])

    before_people = mean_ma(memorizer, PEOPLE)
    after_forget = mean_ma(muted, CANARIES[:1])[0]
    after_people = mean_ma(muted, PEOPLE)
    unseen_level = sum(mean_ma(memorizer, UNSEEN)) / len(UNSEEN)
    assert mean_ma(memorizer, CANARIES[:1])[0] > 0.95 and min(before_people) > 0.95
    assert after_forget <= unseen_level, (after_forget, unseen_level)
    kept = sum(after_people) / sum(before_people)
    # the README's numbers: `python -m pytest -s tests/test_end_to_end.py` prints them
    print(f"\nseed {seed}: canary MA {after_forget:.3f} (unseen {unseen_level:.3f}); the people keep "
          f"{100 * kept:.1f} % of their MA")
    assert kept >= 0.90, kept
