"""training/trl_tokens.py: the one check that TRL's tokens are the scorer's, for SFT's and DPO's datasets.

The rule (a mismatch raises a UserError, never a warning) is in the module's docstring.
"""

from __future__ import annotations

import pytest
from datasets import Dataset

from sarcasm_dpo.errors import UserError
from sarcasm_dpo.models import load_tokenizer
from sarcasm_dpo.prompts import build_prompts, label_token_ids
from sarcasm_dpo.training.trl_tokens import check_trl_tokens, trl_prompts

TEXTS = ["Oh great, rain again.", "The meeting is at noon."]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def _dpo_rows(tok, prompts):
    no_id, yes_id = label_token_ids(tok)
    ids = tok(prompts)["input_ids"]
    return {"prompt_ids": ids, "chosen_ids": [[yes_id, tok.eos_token_id]] * len(ids),
            "rejected_ids": [[no_id, tok.eos_token_id]] * len(ids)}


def _sft_rows(tok, prompts, shift: int = 0):
    """SFTTrainer's shape: one sequence, the loss on the answer; `shift` moves the answer's start earlier."""
    _, yes_id = label_token_ids(tok)
    rows = {"input_ids": [], "labels": []}
    for ids in tok(prompts)["input_ids"]:
        seq = ids + [yes_id, tok.eos_token_id]
        start = len(ids) - shift
        rows["input_ids"].append(seq)
        rows["labels"].append([-100] * start + seq[start:])
    return rows


def test_equal_tokens_pass_silently(tok):
    import warnings

    prompts = trl_prompts(tok, build_prompts(tok, TEXTS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_trl_tokens(Dataset.from_dict(_dpo_rows(tok, prompts)), prompts, tok, 512, what="Pair")
        check_trl_tokens(Dataset.from_dict(_sft_rows(tok, prompts)), prompts, tok, 512)


def test_different_prompt_tokens_raise_in_both_shapes(tok):
    prompts = trl_prompts(tok, build_prompts(tok, TEXTS))
    dpo = _dpo_rows(tok, prompts)
    dpo["prompt_ids"][1] = dpo["prompt_ids"][1][:-1]  # the last prompt token merged into the answer
    with pytest.raises(UserError, match=r"Pair 1: TRL's prompt tokens differ from the scorer's.*--pair_style label"):
        check_trl_tokens(Dataset.from_dict(dpo), prompts, tok, 512, what="Pair",
                         fix="use --pair_style label or another model")
    sft = Dataset.from_dict(_sft_rows(tok, prompts, shift=1))
    with pytest.raises(UserError, match=r"Example 0: TRL's prompt tokens differ from the scorer's"):
        check_trl_tokens(sft, prompts, tok, 512)


def test_dropped_or_cut_examples_raise(tok):
    prompts = trl_prompts(tok, build_prompts(tok, TEXTS))
    with pytest.raises(UserError, match="TRL dropped 1 pair"):
        check_trl_tokens(Dataset.from_dict(_dpo_rows(tok, prompts[:1])), prompts, tok, 512, what="Pair")
    longest = max(len(i) for i in tok(prompts)["input_ids"]) + 2
    with pytest.raises(UserError, match=f"needs {longest} tokens but --max_length is {longest - 1}"):
        check_trl_tokens(Dataset.from_dict(_dpo_rows(tok, prompts)), prompts, tok, longest - 1, what="Pair")


class _AddsSpecialTokens:
    """The tiny tokenizer, but appending EOS when asked for special tokens (which the chat template lacks)."""

    def __init__(self, tok):
        self.tok, self.bos_token = tok, None

    def __getattr__(self, name):  # the rest (convert_ids_to_tokens, ...) is the tiny tokenizer's
        return getattr(self.tok, name)

    def __call__(self, text, add_special_tokens=True, **kwargs):
        out = self.tok(text, add_special_tokens=False, **kwargs)
        if add_special_tokens:
            out["input_ids"] = [ids + [self.tok.eos_token_id] for ids in out["input_ids"]]
        return out


def test_a_tokenizer_adding_special_tokens_is_refused(tok):
    prompts = build_prompts(tok, TEXTS)
    assert trl_prompts(tok, prompts) == prompts  # Qwen's format: the template holds every special token
    # The message shows where the tokens part: the prompt's end, where TRL's has an EOS more.
    with pytest.raises(UserError, match=r"adds special tokens of its own when TRL tokenizes a prompt.*"
                                        r"TRL's would be \[\d+, \d+, \d+\] \(assistant Ċ <\|im_end\|>\)"):
        trl_prompts(_AddsSpecialTokens(tok), prompts)


class _AddsBOS(_AddsSpecialTokens):
    """A tokenizer that prepends a BOS (here the template's own first token, <|im_start|>)."""

    def __init__(self, tok):
        super().__init__(tok)
        self.bos_token = "<|im_start|>"

    def __call__(self, text, add_special_tokens=True, **kwargs):
        out = self.tok(text, add_special_tokens=False, **kwargs)
        if add_special_tokens:
            bos = self.tok.convert_tokens_to_ids(self.bos_token)
            out["input_ids"] = [[bos] + ids for ids in out["input_ids"]]
        return out


def test_a_leading_bos_is_cut_from_the_text_so_it_is_not_doubled(tok):
    prompts = build_prompts(tok, TEXTS)
    adds_bos = _AddsBOS(tok)
    given = trl_prompts(adds_bos, prompts)
    assert given == [p[len("<|im_start|>"):] for p in prompts]
    assert adds_bos(given)["input_ids"] == tok(prompts, add_special_tokens=False)["input_ids"]
