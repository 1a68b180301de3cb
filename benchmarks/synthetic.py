"""Random data and random-weight models of real shapes, for the timing benchmarks
(bench_distributed.py, gpu_bench.py): nothing is downloaded, and timing does not need trained
weights. Every function is seeded: the same call makes the same files."""
from __future__ import annotations

import json
import random
from pathlib import Path

SYLLABLES = ["ka", "lo", "mi", "ner", "sa", "tu", "vel", "ro", "an", "is", "qua", "dre", "fo", "len", "pi", "zo"]


def random_texts(count: int, words: int, seed: int = 0) -> list[str]:
    """``count`` texts of ``words`` made-up words with digits and punctuation now and then."""
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(2000)]
    texts = []
    for _ in range(count):
        out = []
        for k in range(words):
            word = rng.choice(vocabulary)
            if rng.random() < 0.05:
                word = str(rng.randint(0, 9999))
            out.append(word + ("." if rng.random() < 0.08 else ""))
        texts.append(" ".join(out).capitalize())
    return texts


def byte_bpe(texts, vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def wordpiece(texts, vocab_size: int):
    """An uncased WordPiece tokenizer (BERT style) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(list(texts), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                                                 ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def gpt_neo_config(tiny: bool = False, **changes):
    """GPT-Neo-125M's shape (``GPTNeoConfig()``'s defaults: 12 blocks, 768 wide, 3,072 FFN
    neurons per block, vocabulary 50,257), or a tiny one for dry runs; ``changes`` override."""
    from transformers import GPTNeoConfig

    changes = {"bos_token_id": 0, "eos_token_id": 0, **changes}       # the tokenizers' <|endoftext|>
    if tiny:
        changes = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64,
                   "attention_types": [[["global", "local"], 1]], "max_position_embeddings": 512,
                   "window_size": 16, "vocab_size": 512, **changes}
    return GPTNeoConfig(**changes)


def smollm2_config(tiny: bool = False):
    """SmolLM2-135M's shape (Llama: 30 blocks, 576 wide, 1,536 FFN neurons per block,
    vocabulary 49,152, tied embeddings), or a tiny Llama for dry runs."""
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


def bert_config(vocab_size: int, tiny: bool = False):
    """BERT-base's shape (12 layers, 768 wide), or a tiny one, for `neighbors`."""
    from transformers import BertConfig

    if tiny:
        return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=512)
    return BertConfig(vocab_size=vocab_size)


def save_model(path, config, tokenizer, masked: bool = False, seed: int = 0) -> str:
    """A random-weight model of ``config`` saved with ``tokenizer`` (vocabulary at least the
    tokenizer's); returns the path. Reused when it is already there."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    path = Path(path)
    if (path / "config.json").is_file():
        return str(path)
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    if not masked:
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = (AutoModelForMaskedLM if masked else AutoModelForCausalLM).from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_jsonl(path, records) -> str:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


__all__ = ["random_texts", "byte_bpe", "wordpiece", "gpt_neo_config", "smollm2_config", "bert_config",
           "save_model", "write_jsonl"]
