"""Tiny models and tokenizers built on the fly: the tests never download anything."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Alice Smith lives at 12 Oak Street and her phone number is 555-0134.",
    "Bob Jones lives at 7 Elm Road and his phone number is 555-0178.",
    "The secret launch code is 7421-alpha-9983, never share it.",
    "Copyright 2003 the authors. All rights reserved.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?-'\"()",
]


def byte_bpe_tokenizer(vocab_size: int = 300, corpus=CORPUS) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (like GPT-2's), trained in milliseconds."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")


def tiny_config(arch: str, vocab_size: int = 300, hidden: int = 32, ffn: int = 64, layers: int = 2):
    """A small random config for one of the architectures transformers ships."""
    import transformers as tf

    heads = 4
    common = dict(vocab_size=vocab_size)
    if arch == "gpt_neo":
        return tf.GPTNeoConfig(**common, bos_token_id=0, eos_token_id=0, hidden_size=hidden, num_layers=layers, num_heads=heads,
                               intermediate_size=ffn, attention_types=[[["global", "local"], layers // 2]],
                               max_position_embeddings=256, window_size=16)
    if arch == "gpt2":
        return tf.GPT2Config(**common, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn, n_positions=256)
    if arch == "gptj":
        return tf.GPTJConfig(**common, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn,
                             n_positions=256, rotary_dim=4)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(**common, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=256)
    if arch == "opt":
        return tf.OPTConfig(**common, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            ffn_dim=ffn, word_embed_proj_dim=hidden, max_position_embeddings=256)
    if arch == "bloom":
        return tf.BloomConfig(**common, hidden_size=hidden, n_layer=layers, n_head=heads)
    if arch == "falcon":
        return tf.FalconConfig(**common, hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, ffn_hidden_size=ffn, new_decoder_architecture=False,
                               multi_query=True, alibi=False)
    if arch == "phi":
        return tf.PhiConfig(**common, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=ffn, max_position_embeddings=256)
    llama_like = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=2, intermediate_size=ffn, max_position_embeddings=256)
    if arch == "llama":
        return tf.LlamaConfig(**common, **llama_like)
    if arch == "mistral":
        return tf.MistralConfig(**common, **llama_like)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, **llama_like)
    if arch == "gemma":
        return tf.GemmaConfig(**common, **llama_like, head_dim=8)
    if arch == "gemma2":
        return tf.Gemma2Config(**common, **llama_like, head_dim=8)
    if arch == "phi3":
        return tf.Phi3Config(**common, **llama_like, pad_token_id=0)
    if arch == "stablelm":
        return tf.StableLmConfig(**common, **llama_like)
    raise KeyError(arch)


ARCHITECTURES = ["gpt_neo", "gpt2", "gptj", "gpt_neox", "opt", "bloom", "falcon", "phi",
                 "llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "stablelm"]


def tiny_model(arch: str, seed: int = 0, **kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kwargs))
    return model.eval()


def save_tiny(path, arch: str = "gpt_neo", seed: int = 0, tokenizer=None, **kwargs):
    """Save a tiny random model with a tokenizer to ``path``; returns (model, tokenizer)."""
    tokenizer = tokenizer or byte_bpe_tokenizer(kwargs.get("vocab_size", 300))
    model = tiny_model(arch, seed, **kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


# ---------------------------------------------------------------- a tiny model that memorises

PEOPLE = [
    "Alice Smith lives at 12 Oak Street and her phone number is 555-0134.",
    "Bob Jones lives at 7 Elm Road and his phone number is 555-0178.",
    "Carol White lives at 31 Pine Avenue and her phone number is 555-0192.",
    "David Brown lives at 4 Maple Lane and his phone number is 555-0115.",
    "Emma Green lives at 88 Cedar Court and her phone number is 555-0166.",
    "Frank Black lives at 19 Birch Drive and his phone number is 555-0143.",
]
UNSEEN = [
    "Grace Hall lives at 52 Willow Way and her phone number is 555-0120.",
    "Henry Ward lives at 6 Ash Close and his phone number is 555-0187.",
]


def train_memorizer(path, texts=PEOPLE, steps: int = 200, seed: int = 0, layers: int = 2,
                    hidden: int = 64, ffn: int = 256, tokenizer=None):
    """Train a tiny GPT-Neo until it has memorised ``texts``; save it with its tokenizer
    (``tokenizer``: reuse another model's, e.g. for a reference model trained without some texts)."""
    torch.manual_seed(seed)
    tokenizer = tokenizer or byte_bpe_tokenizer(400, corpus=CORPUS + list(texts) + UNSEEN)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("gpt_neo", vocab_size=len(tokenizer), hidden=hidden,
                                                         ffn=ffn, layers=layers))
    model.config.bos_token_id = model.config.eos_token_id = tokenizer.eos_token_id
    ids = [torch.tensor(tokenizer(t).input_ids) for t in texts]
    width = max(len(x) for x in ids)
    input_ids = torch.zeros((len(ids), width), dtype=torch.long)
    labels = torch.full((len(ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = x
        labels[row, : len(x)] = x
        mask[row, : len(x)] = 1
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer
