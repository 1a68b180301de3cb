"""Helpers shared by the demo's training scripts: JSONL texts, one byte-level BPE vocabulary."""
from __future__ import annotations

import json
import os

# The LM and the masked LM share one byte-level BPE vocabulary: the MLM's neighbours then come
# back in exactly the LM's text form (no lower-casing, no spaces around punctuation).
EOS = "<|endoftext|>"
CLS, SEP, MASK, PAD = "[CLS]", "[SEP]", "[MASK]", "[PAD]"
SPECIAL = [EOS, PAD, CLS, SEP, MASK]


def read_texts(*paths: str) -> list[str]:
    texts = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            texts += [json.loads(line)["text"] for line in fh if line.strip()]
    return texts


def train_tokenizer(texts, vocab_size: int, path: str):
    """Train the shared byte-level BPE on ``texts`` and save it as ``path`` (tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tok.save(path)
    return tok


def lm_tokenizer(path: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=path, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS)


def mlm_tokenizer(path: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=path, cls_token=CLS, sep_token=SEP, mask_token=MASK,
                                   pad_token=PAD, unk_token=EOS, additional_special_tokens=[EOS])


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))
