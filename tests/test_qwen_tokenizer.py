"""Qwen2.5's real tokenizer built offline (bench/qwen_tokenizer.py), and our code on a tiny Qwen2 that uses it.

The ids and the prompt format below are Qwen2.5-Instruct's (its tokenizer.json / tokenizer_config.json);
the tokenizer is rebuilt from the BPE ranks in the dashscope wheel, so these tests check the rebuild.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

KNOWN_IDS = {"Hello": [9707], "Yes": [9454], "No": [2753], "system": [8948], "user": [872],
             "Hello world": [9707, 1879], " 12345": [220, 16, 17, 18, 19, 20]}  # Qwen2 splits digits one by one
SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
               "<|vision_pad|>": 151654, "<|video_pad|>": 151656, "<tool_call>": 151657, "<|fim_prefix|>": 151659,
               "<|file_sep|>": 151664}
QWEN_PROMPT = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
               "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def tok(qwen_tokenizer_dir):
    from sarcasm_dpo.models import load_tokenizer

    return load_tokenizer(str(qwen_tokenizer_dir))


def test_known_ids_and_special_tokens(tok):
    for text, ids in KNOWN_IDS.items():
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, text
    for text, i in SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(text) == i and tok(text, add_special_tokens=False)["input_ids"] == [i]
    assert len(tok) == 151_665
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 151645,
                                                                                   "<|endoftext|>", 151643)
    assert tok.bos_token is None


def test_chat_template_renders_qwen25_format(tok):
    from sarcasm_dpo.prompts import QUESTION, build_prompt

    text = "Oh great, another Monday."
    assert build_prompt(tok, text) == QWEN_PROMPT.format(content=QUESTION.format(text=text))
    own_system = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Yes"}], tokenize=False)
    assert own_system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" \
                         "<|im_start|>assistant\nYes<|im_end|>\n"


def test_round_trip_decode(tok):
    for text in ["Oh great, rain AGAIN!!! 🙄 Thanks a lot...", "naïve café — «quotes»\n\n  tabs\tand  spaces ",
                 "<|im_start|>user\nmixed<|im_end|>", "日本語のテキスト", "'s 've 'LL I'M"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    ids = tok("a<|im_end|>b", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_label_token_ids_on_the_real_tokenizer(tok):
    from sarcasm_dpo.prompts import label_token_ids

    assert label_token_ids(tok) == (2753, 9454)  # (No, Yes): the ids the scorer reads


def test_long_text_is_cut_on_the_default_models_template(tok):
    from sarcasm_dpo.prompts import QUESTION, build_prompt, build_prompts

    long_text = "Oh sure, because waiting three hours for a train is exactly how I wanted to spend my day. " * 40
    short = "Fine weather today."
    prompts = build_prompts(tok, [long_text, short], max_text_tokens=256)
    assert prompts == [build_prompt(tok, long_text, 256), build_prompt(tok, short, 256)]
    cut = prompts[0][len(QWEN_PROMPT.split("{content}")[0]) + len(QUESTION.split("{text}")[0]):].split("<|im_end|>")[0]
    assert cut.endswith(" ...") and long_text.startswith(cut[:-4])
    assert len(tok(cut[:-4], add_special_tokens=False)["input_ids"]) <= 256
    assert prompts[0].endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert prompts[1] == QWEN_PROMPT.format(content=QUESTION.format(text=short))


def test_scorer_prefix_cache_matches_plain_path_on_tiny_qwen(tiny_qwen_real_dir):
    """The shared-prefix cache on Qwen2.5's real template (its system turn and our question: one shared prefix)."""
    from sarcasm_dpo import scoring
    from sarcasm_dpo.models import load_model
    from sarcasm_dpo.scoring import Scorer

    model, tok = load_model(str(tiny_qwen_real_dir), device="cpu")
    assert model.config.vocab_size == 151_936
    texts = ["Oh great, rain again.", "The meeting is at noon.", "I just love waiting in line for hours!",
             "Science says so.", "What a surprise, the train is late " * 12]
    plain = Scorer(model, tok, batch_size=2, prefix_cache=False).predict_proba(texts)
    cached = Scorer(model, tok, batch_size=2).predict_proba(texts)
    np.testing.assert_allclose(cached, plain, atol=1e-5)
    assert scoring.shared_prefix_length(Scorer(model, tok).encode(texts)) >= 40  # system turn + question
    assert ((plain > 0) & (plain < 1)).all()


def test_pinned_ranks_file_is_checked(tmp_path, monkeypatch):
    """A cached ranks file with the wrong content is not used: it is fetched again (here: refused offline)."""
    import qwen_tokenizer

    (tmp_path / "qwen.tiktoken").write_text("bad")
    monkeypatch.setattr(qwen_tokenizer, "DASHSCOPE", "dashscope==0.0.0-not-a-version")
    with pytest.raises(qwen_tokenizer.Unavailable, match="pip download"):
        qwen_tokenizer.ranks_file(tmp_path)
