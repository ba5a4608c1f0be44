"""Models and tokenizers other than Qwen's: GPT-2's Conv1D layers, output layers of any name, PEFT's own
target matching, SentencePiece tokenizers that add a BOS, label words a vocabulary lacks or a template merges,
and templates that read the clock. Tiny random models from tests/variety_models.py (2 layers, width 32).
"""

from __future__ import annotations

import datetime
import json
from types import SimpleNamespace

import pytest
import variety_models as vm

from sarcasm_dpo.errors import UserError
from sarcasm_dpo.prompts import build_prompt, build_prompts, dated_template, label_token_ids
from sarcasm_dpo.stages import sft
from sarcasm_dpo.training.trl_tokens import check_trl_tokens, trl_prompts, trl_tokenizer


@pytest.fixture(scope="module")
def bytelevel():
    return vm.bytelevel_tokenizer()


@pytest.fixture(scope="module")
def gpt2_dir(bytelevel, tmp_path_factory):
    return vm.save(tmp_path_factory.mktemp("gpt2"), vm.gpt2(bytelevel), bytelevel)


@pytest.fixture(scope="module")
def spm():
    return vm.sentencepiece_tokenizer()


def _lora_names(model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, LoraLayer)}


# -- which layers LoRA may adapt (sft.check_lora_targets) --------------------------------------------------


def test_gpt2_conv1d_layers_are_lora_targets(bytelevel):
    model = vm.gpt2(bytelevel)
    sft.check_lora_targets(model, ["c_attn", "c_proj"])  # Conv1D, not torch.nn.Linear: PEFT adapts them
    sft.check_lora_targets(model, ["attn.c_proj"])
    with pytest.raises(UserError) as refused:
        sft.check_lora_targets(model, ["q_proj", "v_proj"])
    message = str(refused.value)
    assert "Its layers that LoRA can adapt are: c_attn, c_fc, c_proj, wpe;" in message, message
    assert "lm_head" not in message and "wte" not in message  # the output layer, and the embedding tied to it


@pytest.mark.parametrize("build, target, named", [
    (vm.llama, "lm_head", "lm_head, the output layer"),
    (vm.neox_japanese, "embed_out", "embed_out, the output layer"),  # the output layer by another name
    (vm.gpt2, "wte", "transformer.wte, the input embedding, which shares its weights with the output layer"),
])
def test_the_output_layer_is_refused_whatever_its_name(bytelevel, build, target, named):
    model = build(bytelevel)
    with pytest.raises(UserError, match=f"--lora_targets {target} names {named}") as refused:
        sft.check_lora_targets(model, ["q_proj", target] if build is vm.llama else [target])
    listed = str(refused.value).split("can adapt are: ")[1].split(";")[0].split(", ")
    assert target not in listed


def test_all_linear_and_dotted_suffixes_match_as_peft_matches(bytelevel):
    from peft import get_peft_model

    def adapted(targets):
        sft.check_lora_targets(model := vm.llama(bytelevel), targets)
        s = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets=targets)
        return _lora_names(get_peft_model(model, sft.lora_config(s)))

    every = adapted(["all-linear"])
    assert len(every) == 14 and "lm_head" not in every  # 7 per layer, never the output layer
    assert adapted(["self_attn.q_proj", "mlp.down_proj"]) == {f"model.layers.{i}.{n}" for i in (0, 1)
                                                              for n in ("self_attn.q_proj", "mlp.down_proj")}
    assert adapted(["model.layers.1.self_attn.v_proj"]) == {"model.layers.1.self_attn.v_proj"}
    with pytest.raises(UserError, match="all-linear stands alone"):
        sft.check_lora_targets(vm.llama(bytelevel), ["all-linear", "q_proj"])
    with pytest.raises(UserError, match="--lora_targets attn.q_proj match no layer"):
        sft.check_lora_targets(vm.llama(bytelevel), ["attn.q_proj"])  # a suffix of whole names, not of text


def test_sft_trains_gpt2_with_all_linear_and_records_it_truly(gpt2_dir, tmp_path):
    from test_sft import settings, toy_frame

    from sarcasm_dpo.models import check_adapter_fits

    toy_frame(16, 1).to_csv(train := tmp_path / "train.csv", index=False)
    toy_frame(8, 2).to_csv(val := tmp_path / "val.csv", index=False)
    out = tmp_path / "sft"
    sft.run(settings(gpt2_dir, train, val, out, epochs=1, lora_targets=["all-linear"]))
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(f"transformer.h.{i}.{n}" for i in (0, 1)
                                                      for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert json.loads((out / "training_summary.json").read_text())["config"]["lora_targets"] == ["all-linear"]
    check_adapter_fits(out, str(gpt2_dir))  # Conv1D's (in, out) layout read as such


def test_a_conv1d_adapter_on_another_width_names_the_widths(bytelevel, tmp_path):
    from peft import LoraConfig, get_peft_model

    from sarcasm_dpo.models import check_adapter_fits

    narrow = vm.save(tmp_path / "narrow", vm.gpt2(bytelevel), bytelevel)
    wide = vm.save(tmp_path / "wide", vm.gpt2(bytelevel, width=48), bytelevel)
    get_peft_model(vm.gpt2(bytelevel), LoraConfig(r=4, target_modules=["c_attn"])).save_pretrained(tmp_path / "a")
    check_adapter_fits(tmp_path / "a", str(narrow))
    # Inputs -> outputs, in that order (Conv1D stores its weight as 48 x 144).
    with pytest.raises(UserError, match=r"e\.g\. transformer\.h\.0\.attn\.c_attn is 48->144 wide, the adapter's "
                                        r"lora_A expects 32\)"):
        check_adapter_fits(tmp_path / "a", str(wide))


# -- TRL's tokens for a tokenizer that adds a BOS (training/trl_tokens.py) -----------------------------------


TEXTS = ["oh great, another monday", "the meeting was useful"]


def test_a_sentencepiece_tokenizer_adding_a_bos_trains_on_the_scorers_tokens(spm, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    prompts = build_prompts(spm, TEXTS)
    scorer = spm(prompts, add_special_tokens=False)["input_ids"]
    assert spm.convert_ids_to_tokens(scorer[0][:2]) == ["<s>", "["]  # after <s>, no "▁" before "["
    given = trl_tokenizer(spm)
    assert given is not spm and trl_tokenizer(given) is given and trl_tokenizer(vm.bytelevel_tokenizer()) is not None
    trainer = SFTTrainer(model=vm.llama(spm), processing_class=given, peft_config=LoraConfig(r=4),
                         args=SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, report_to=[],
                                        use_cpu=True, bf16=False),
                         train_dataset=Dataset.from_dict({"prompt": trl_prompts(given, prompts),
                                                          "completion": ["Yes", "No"]}))
    check_trl_tokens(trainer.train_dataset, trl_prompts(given, prompts), given, 512)
    assert [row["input_ids"][:len(ids)] for row, ids in zip(trainer.train_dataset, scorer)] == scorer
    assert spm(prompts)["input_ids"][0][:2] == [spm.bos_token_id] * 2  # the tokenizer itself: two BOS


def test_the_view_saves_what_the_tokenizer_saves(spm, tmp_path):
    spm.save_pretrained(tmp_path / "own")
    trl_tokenizer(spm).save_pretrained(tmp_path / "view")
    for path in (tmp_path / "own").iterdir():
        assert (tmp_path / "view" / path.name).read_bytes() == path.read_bytes(), path.name


def test_prompts_tokenizer_and_trl_cannot_agree_on_name_the_first_ids_of_both(spm):
    with pytest.raises(UserError, match=r"the scorer's prompt tokens start with ids \[1, \d+, \d+, \d+\] \(<s> \[ "
                                        r"INST \]\), TRL's would be \[1, \d+, \d+, \d+\] \(<s> ▁ \[ INST\)"):
        trl_prompts(spm, build_prompts(spm, TEXTS))  # the tokenizer as it is: with the BOS text cut, "▁" comes back


# -- label words (prompts.label_token_ids) ---------------------------------------------------------------


def test_a_label_word_outside_the_vocabulary_is_refused_not_read_as_unk():
    assert label_token_ids(vm.wordlevel_tokenizer(()))  # with both words: fine
    with pytest.raises(UserError, match=r"'Yes' is not in this tokenizer's vocabulary: it is read as the unknown "
                                        r"token '<unk>' \(id 0\)"):
        label_token_ids(vm.wordlevel_tokenizer(("Yes",)))


def test_a_label_word_the_tokenizer_rewrites_is_refused():
    from tokenizers import normalizers

    tok = vm.bytelevel_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(UserError, match=r"'No' becomes token \d+, which reads back as 'no'"):
        label_token_ids(tok)


def test_a_generation_prompt_ending_in_a_space_names_the_cause():
    template = ("{% for message in messages %}{{ message['role'].upper() + ': ' + message['content'] + '\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}")
    tok = vm.bytelevel_tokenizer(template, extra_corpus=["ASSISTANT: Yes", "ASSISTANT: No"] * 300)
    with pytest.raises(UserError, match=r"generation prompt ends in whitespace \('.*ASSISTANT: '\).*rewrites the "
                                        r"prompt's last token\(s\) \['Ġ'\] into \['ĠNo'\]") as refused:
        label_token_ids(tok)
    assert "not a single token" not in str(refused.value)


# -- the date in the prompt (prompts.dated_template) -----------------------------------------------------


LLAMA_DATE = ("{%- if not date_string is defined %}{%- if strftime_now is defined %}"
              "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = 'never' %}"
              "{%- endif %}{%- endif %}"
              "{{ '<|im_start|>system\nToday Date: ' + date_string + '<|im_end|>\n' }}")
PLAIN_DATE = "\n{{ '<|im_start|>system\nToday is ' + strftime_now('%Y-%m-%d') + '.<|im_end|>\n' }}"  # a 1st newline
TURNS = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
         "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _clock(monkeypatch, day: datetime.datetime) -> None:
    """transformers' strftime_now reads datetime.now() of its rendering module: set that day."""
    import transformers.utils.chat_template_utils as rendering

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return day

    monkeypatch.setattr(rendering, "datetime", Clock)


@pytest.mark.parametrize("header, stated", [(LLAMA_DATE, "Today Date: 26 Jul 2024"),
                                            (PLAIN_DATE, "Today is 2024-07-26.")])
def test_the_prompt_states_the_same_date_on_every_day(monkeypatch, header, stated):
    from sarcasm_dpo.prompts import PROMPT_DATE, QUESTION

    tok = vm.bytelevel_tokenizer(header + TURNS)
    seen = []
    for day in (datetime.datetime(2026, 1, 1), datetime.datetime(2026, 1, 2)):
        _clock(monkeypatch, day)
        seen.append((build_prompt(tok, "x"), label_token_ids(tok)))
    assert seen[0] == seen[1] and stated in seen[0][0]
    # Pinned, the template renders what it renders on PROMPT_DATE itself, to the character (first newline kept).
    _clock(monkeypatch, datetime.datetime.combine(PROMPT_DATE, datetime.time()))
    messages = [{"role": "user", "content": QUESTION.format(text="x")}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == seen[0][0]
    # A tokenizer that holds the pinned template (as an export's may) renders the scorer's prompt with plain
    # transformers on any day, and pinning it again changes nothing.
    _clock(monkeypatch, datetime.datetime(2030, 5, 5))
    tok.chat_template = dated_template(tok)
    assert dated_template(tok) == tok.chat_template
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == seen[0][0]


def test_a_template_without_a_date_is_used_as_it_is(bytelevel):
    assert dated_template(bytelevel) == bytelevel.chat_template


# -- through the stages: a Llama with a BOS-adding SentencePiece tokenizer, an export of a dated template ----------


def test_a_llama_whose_tokenizer_adds_a_bos_trains_sft_then_dpo_on_the_scorers_tokens(spm, tmp_path):
    """The stages hand TRL `trl_tokenizer(tokenizer)` (its prompts and its check with it): SFT and DPO run on a
    SentencePiece tokenizer that adds a BOS, which used to be refused with a message that did not hold."""
    from test_dpo import dpo_settings, write_toy_splits
    from test_sft import settings, toy_frame

    from sarcasm_dpo.stages import dpo

    model_dir = vm.save(tmp_path / "llama", vm.llama(spm), spm)
    toy_frame(16, 1).to_csv(train := tmp_path / "train.csv", index=False)
    toy_frame(8, 2).to_csv(val := tmp_path / "val.csv", index=False)
    sft.run(settings(model_dir, train, val, tmp_path / "sft", epochs=1, max_text_tokens=32))
    toy = SimpleNamespace(sft=tmp_path / "sft", paths=write_toy_splits(tmp_path / "splits"))
    summary = dpo.run(dpo_settings(toy, tmp_path / "dpo", epochs=1, max_text_tokens=32, sample_size=8,
                                   val_sample_size=8, probe_size=4))
    assert summary["global_steps"] >= 1 and (tmp_path / "dpo" / "COMPLETE.json").is_file()


def test_an_export_saves_its_template_with_the_date_the_scorer_pins(monkeypatch, tmp_path):
    """`predict --model exported/` and the card's plain-transformers snippet render the export's own template: it is
    saved pinned to prompts.PROMPT_DATE, so on any later day it gives the prompt the model was trained and scored
    with, not one stating that day."""
    from test_dpo import make_sft_adapter
    from transformers import AutoTokenizer

    from sarcasm_dpo.cli import main
    from sarcasm_dpo.prompts import QUESTION

    tok = vm.bytelevel_tokenizer(LLAMA_DATE + TURNS)
    model_dir = vm.save(tmp_path / "llama", vm.llama(tok), tok)
    adapter = make_sft_adapter(model_dir, tmp_path / "sft")
    record = {"config": {"model": str(model_dir), "max_text_tokens": 64},
              "best_val": {"f1": 0.5, "accuracy": 0.5, "n": 8, "roc_auc": 0.5, "threshold": 0.5}}
    (adapter / "training_summary.json").write_text(json.dumps(record))  # what export reads (as test_export's)
    expected = build_prompt(tok, "x")
    _clock(monkeypatch, datetime.datetime(2031, 3, 3))
    assert main(["export", "--adapter", str(adapter), "--output_dir", str(tmp_path / "exported"), "--results", ""]) == 0
    saved = AutoTokenizer.from_pretrained(tmp_path / "exported")
    messages = [{"role": "user", "content": QUESTION.format(text="x")}]
    assert saved.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    assert "26 Jul 2024" in expected and "2031" not in expected
