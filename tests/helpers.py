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
        return tf.GPTNeoConfig(**common, hidden_size=hidden, num_layers=layers, num_heads=heads,
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
