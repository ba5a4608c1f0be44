"""The one prompt: chat template, single-token labels, truncation inside the prompt only."""

from __future__ import annotations

import pytest

from sarcasm_dpo.errors import UserError
from sarcasm_dpo.models import load_tokenizer
from sarcasm_dpo.prompts import QUESTION, build_prompt, label_token_ids, label_word


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def test_prompt_uses_chat_template_and_ends_at_answer(tok):
    prompt = build_prompt(tok, "Oh great, rain again.")
    assert prompt.startswith("<|im_start|>user\n")
    assert QUESTION.format(text="Oh great, rain again.") in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_labels_are_single_distinct_tokens(tok):
    no_id, yes_id = label_token_ids(tok)
    assert tok.convert_ids_to_tokens([no_id, yes_id]) == ["No", "Yes"]
    assert label_word(1) == "Yes" and label_word(0) == "No"


def test_long_text_is_cut_inside_the_prompt(tok):
    long_text = "the train is late again " * 200
    prompt = build_prompt(tok, long_text, max_text_tokens=20)
    text_part = prompt.split("Text: ")[1].split("<|im_end|>")[0]
    assert len(tok(text_part.replace(" ...", ""), add_special_tokens=False)["input_ids"]) <= 21
    assert prompt.endswith("<|im_start|>assistant\n")  # the answer position survives


def test_multi_token_label_is_refused(tok, monkeypatch):
    import sarcasm_dpo.prompts as prompts

    monkeypatch.setattr(prompts, "LABEL_WORDS", ("No", "Absolutely-sarcastic"))
    with pytest.raises(UserError, match="not a single token"):
        prompts.label_token_ids(tok)


def test_missing_chat_template_is_a_clear_error(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "nochat"
    shutil.copytree(tiny_model_dir, copy)
    cfg = copy / "tokenizer_config.json"
    import json

    data = json.loads(cfg.read_text())
    data.pop("chat_template", None)
    cfg.write_text(json.dumps(data))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (copy / extra).unlink(missing_ok=True)
    with pytest.raises(UserError, match="no chat template"):
        load_tokenizer(str(copy))


BATCH = ["Oh great, rain again.", "", "  padded  ", "line one\nline two", "{braces} and <tags> & 'quotes'",
         "the train is late again " * 200, "ünïcödé 🙃 text"]


def test_build_prompts_gives_build_prompts_strings(tok):
    from sarcasm_dpo.prompts import build_prompts, prompt_frame

    assert prompt_frame(tok) is not None  # this template inserts text verbatim: the fast path is taken
    assert build_prompts(tok, BATCH, max_text_tokens=20) == [build_prompt(tok, t, max_text_tokens=20) for t in BATCH]
    assert build_prompts(tok, [], max_text_tokens=20) == []


def test_a_template_that_alters_the_text_is_rendered_per_prompt(tok, monkeypatch):
    from sarcasm_dpo.prompts import build_prompts, prompt_frame

    trimming = tok.chat_template.replace("message['content']", "message['content'] | trim")
    assert trimming != tok.chat_template
    monkeypatch.setattr(tok, "chat_template", trimming)
    assert prompt_frame(tok) is None
    expected = [build_prompt(tok, t, max_text_tokens=20) for t in BATCH]
    assert expected[2].count("padded<|im_end|>") == 1  # the template really trims (the trailing spaces)
    assert build_prompts(tok, BATCH, max_text_tokens=20) == expected
