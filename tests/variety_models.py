"""Tiny random models and tokenizers of other kinds than the suite's Qwen2 (tests/tiny_model.py), built offline.

GPT-2 (Conv1D layers, weights stored in x out), Llama (untied output layer) and GPT-NeoX-Japanese (output
layer named embed_out) at 2 layers of width 32; tokenizers: byte-level BPE with any chat template, a Llama-2 style
SentencePiece one (Metaspace with prepend_scheme="first", byte fallback, a BOS added by its post-processor
and a template that starts with {{ bos_token }}), and a word-level one whose vocabulary lacks some words.
"""

from __future__ import annotations

from pathlib import Path

from tiny_model import CHAT_TEMPLATE, SPECIALS, _corpus

WIDTH = 32
LLAMA2_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                   "{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}"
                   "{% else %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


def bytelevel_tokenizer(chat_template: str = CHAT_TEMPLATE, extra_corpus: list[str] | None = None):
    """The suite's byte-level BPE tokenizer (Qwen's special tokens), with `chat_template`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus() + (extra_corpus or []), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"], chat_template=chat_template)


def sentencepiece_tokenizer():
    """Llama-2 / Mistral style: it adds <s> itself, and its template starts every prompt with <s> too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace("▁", prepend_scheme="first"),
                                                 pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.Sequence([decoders.Metaspace("▁", prepend_scheme="first"), decoders.ByteFallback(),
                                     decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator(_corpus() + ["[INST] Is the following [/INST]Yes", "[INST] Answer [/INST]No"] * 300,
                            trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=LLAMA2_TEMPLATE)


def wordlevel_tokenizer(missing: tuple[str, ...]):
    """Whole words, Qwen's chat format; the words in `missing` are not in its vocabulary (they become <unk>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(" ".join(_corpus() + ["Is Answer Text No Yes user assistant"]).replace(".", " ").split())
                   - set(missing))
    vocab = {w: i for i, w in enumerate(["<unk>", *SPECIALS, "\n", "?", ":", ".", ","] + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"],
                                   chat_template=CHAT_TEMPLATE)


def _ids(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id)


def gpt2(tokenizer, width: int = WIDTH):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=2, n_head=4, n_positions=1024, **_ids(tokenizer)))


def llama(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                        tie_word_embeddings=False, **_ids(tokenizer)))


def neox_japanese(tokenizer):
    """A causal LM whose output layer is called embed_out (GPT-NeoX's own is lm_head since transformers 5)."""
    import torch
    from transformers import GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM

    torch.manual_seed(0)
    return GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(hidden_size=WIDTH, num_hidden_layers=2,
                                                            num_attention_heads=4, intermediate_multiple_size=2,
                                                            max_position_embeddings=2048, tie_word_embeddings=False,
                                                            **_ids(tokenizer)))


def save(folder: str | Path, model, tokenizer) -> Path:
    """A model folder as `--model` takes it: weights, config, tokenizer and chat template."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    return folder
