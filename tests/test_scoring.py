"""The scorer: one forward pass per batch (the shared prompt prefix once per call), batch-invariant probabilities, adapters, model loading errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sarcasm_dpo.errors import UserError
from sarcasm_dpo.models import attach_adapter, load_model, pick_device, resolve_source
from sarcasm_dpo import scoring
from sarcasm_dpo.scoring import Scorer

TEXTS = ["oh great", "a much longer text about the gun control debate and the evidence people cite", "x",
         "thanks for nothing, the train is late again", "we agreed on the plan"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device=torch.device("cpu"))


def test_probabilities_match_unbatched_and_softmax_of_label_logits(loaded):
    model, tok = loaded
    batched = Scorer(model, tok, batch_size=4).predict_proba(TEXTS)
    single = np.array([Scorer(model, tok, batch_size=1).predict_proba([t])[0] for t in TEXTS])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    # Against a plain full-logits forward of one unpadded prompt.
    scorer = Scorer(model, tok)
    ids = torch.tensor([scorer.encode([TEXTS[3]])[0]])
    logits = model(input_ids=ids).logits[0, -1]
    expected = torch.softmax(logits[[scorer.no_id, scorer.yes_id]], -1)[1].item()
    assert batched[3] == pytest.approx(expected, abs=1e-5)
    assert ((batched > 0) & (batched < 1)).all()


def test_one_forward_pass_per_batch_with_last_position_only(loaded, monkeypatch):
    model, tok = loaded
    monkeypatch.setattr(scoring, "_PREFIX_CHECKED", {})  # this process has not checked the prefix path yet
    calls = []
    original = model.forward

    def spy(*args, **kwargs):
        calls.append((kwargs["input_ids"].shape, kwargs.get("logits_to_keep")))
        out = original(*args, **kwargs)
        assert out.logits.shape[1] == 1  # LM head on the answer position only
        return out

    monkeypatch.setattr(model, "forward", spy)
    texts = [f"text number {i} " * (i % 7 + 1) for i in range(1304)]
    scorer = Scorer(model, tok, batch_size=64)
    encoded = scorer.encode(texts)
    shared = scoring.shared_prefix_length(encoded)
    probs = scorer.predict_proba(texts)
    assert len(probs) == 1304 and all(k == 1 for _, k in calls)
    # The shared prefix once (one row), the first-time check of both paths on two rows, then ceil(1304 / 64) = 21
    # batches that carry only each prompt's own tokens.
    assert calls[0][0] == (1, shared) and shared >= 10
    assert [shape[0] for shape, _ in calls[1:3]] == [2, 2]
    batches = [shape for shape, _ in calls[3:]]
    assert len(batches) == 21 and sum(rows for rows, _ in batches) == 1304
    widths = [width for _, width in batches]
    assert widths == sorted(widths, reverse=True)  # length-sorted batches
    assert widths[0] == max(len(ids) for ids in encoded) - shared
    # Once checked, a second call is the prefix plus the batches and nothing else.
    calls.clear()
    scorer.predict_proba(texts)
    assert len(calls) == 22 and calls[0][0] == (1, shared)


def test_shared_prefix_length_comes_from_the_token_ids():
    assert scoring.shared_prefix_length([[1, 2, 3, 9], [1, 2, 3, 4, 5], [1, 2, 3, 4]]) == 3
    assert scoring.shared_prefix_length([[1, 2, 7], [1, 2, 8]]) == 2  # a merged boundary token is never shared
    assert scoring.shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # every prompt keeps a token of its own
    assert scoring.shared_prefix_length([[1, 2, 3], [1, 2]]) == 1
    assert scoring.shared_prefix_length([[5, 2], [1, 2]]) == 0
    assert scoring.shared_prefix_length([]) == 0


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_shared_prefix_gives_the_plain_paths_probabilities(loaded, monkeypatch, batch_size):
    model, tok = loaded
    monkeypatch.setattr(scoring, "_PREFIX_CHECKED", {})
    texts = TEXTS + ["", "Yes", "a" * 400, "no way, really?"]
    plain = Scorer(model, tok, batch_size=batch_size, prefix_cache=False).predict_proba(texts)
    cached = Scorer(model, tok, batch_size=batch_size, max_text_tokens=256).predict_proba(texts)
    np.testing.assert_allclose(cached, plain, atol=1e-5)
    assert scoring.shared_prefix_length(Scorer(model, tok).encode(texts)) >= 10  # the cache was really used
    assert list(scoring._PREFIX_CHECKED.values()) == [True]


def test_prefix_cache_by_default_on_a_cpu_only(loaded, monkeypatch):
    """The cache saves arithmetic, which only a CPU is short of; on a GPU full prompts were faster."""
    model, tok = loaded
    monkeypatch.setattr(scoring, "_PREFIX_CHECKED", {})
    prefixes = []
    original = Scorer.encode_prefix
    monkeypatch.setattr(Scorer, "encode_prefix", lambda self, ids: prefixes.append(len(ids)) or original(self, ids))
    default = Scorer(model, tok)
    assert default.uses_prefix_cache() and not Scorer(model, tok, prefix_cache=False).uses_prefix_cache()
    plain = Scorer(model, tok, prefix_cache=False).predict_proba(TEXTS)
    assert prefixes == []
    np.testing.assert_allclose(default.predict_proba(TEXTS), plain, atol=1e-5)
    assert prefixes  # the CPU default ran the shared prefix
    # Elsewhere (the model's device as the scorer sees it) the default is full prompts, unless asked.
    monkeypatch.setattr(Scorer, "_device", lambda self: torch.device("cuda"))
    assert not Scorer(model, tok).uses_prefix_cache()
    assert Scorer(model, tok, prefix_cache=True).uses_prefix_cache()
    _, prefix = Scorer(model, tok).plan_encoded(default.encode(TEXTS))
    assert prefix is None


def test_shared_prefix_with_an_adapter(loaded, monkeypatch):
    from peft import LoraConfig, get_peft_model

    model, tok = loaded
    monkeypatch.setattr(scoring, "_PREFIX_CHECKED", {})
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"],
                                                  init_lora_weights=False))
    try:
        cached = Scorer(peft_model, tok).predict_proba(TEXTS)
        plain = Scorer(peft_model, tok, prefix_cache=False).predict_proba(TEXTS)
        np.testing.assert_allclose(cached, plain, atol=1e-5)
        assert scoring._PREFIX_CHECKED and all(scoring._PREFIX_CHECKED.values())
    finally:
        peft_model.unload()


def test_a_cache_that_does_not_compose_falls_back_with_a_warning(loaded, monkeypatch):
    """An architecture whose cache gives other numbers is scored the plain way, and says so."""
    model, tok = loaded
    monkeypatch.setattr(scoring, "_PREFIX_CHECKED", {})
    plain = Scorer(model, tok, prefix_cache=False).predict_proba(TEXTS)
    original = scoring.PrefixCache.cache_for

    def broken(self, rows):
        cache = original(self, rows)
        for layer in cache.layers:
            layer.keys = torch.randn_like(layer.keys) * 10
        return cache

    monkeypatch.setattr(scoring.PrefixCache, "cache_for", broken)
    with pytest.warns(UserWarning, match="without the shared-prefix cache.*differs by"):
        first = Scorer(model, tok).predict_proba(TEXTS)
    np.testing.assert_allclose(first, plain, atol=1e-6)
    assert list(scoring._PREFIX_CHECKED.values()) == [False]
    np.testing.assert_allclose(Scorer(model, tok).predict_proba(TEXTS), plain, atol=1e-6)  # no second check

    def raising(self, rows):
        raise TypeError("no cache here")

    monkeypatch.setattr(scoring, "_PREFIX_CHECKED", {})
    monkeypatch.setattr(scoring.PrefixCache, "cache_for", raising)
    with pytest.warns(UserWarning, match="TypeError: no cache here"):
        np.testing.assert_allclose(Scorer(model, tok).predict_proba(TEXTS), plain, atol=1e-6)


def test_adapter_changes_scores_and_reloads(loaded, tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = loaded
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    in_memory = Scorer(peft_model, tok).predict_proba(TEXTS)
    peft_model.save_pretrained(tmp_path / "adapter")
    base = peft_model.unload()
    plain = Scorer(base, tok).predict_proba(TEXTS)
    assert not np.allclose(in_memory, plain)
    reloaded_model, _ = load_model(str(tiny_model_dir), adapter=str(tmp_path / "adapter"), device=torch.device("cpu"))
    np.testing.assert_allclose(Scorer(reloaded_model, tok).predict_proba(TEXTS), in_memory, atol=1e-6)


def test_adapter_errors(tiny_model_dir, tmp_path):
    model, _ = load_model(str(tiny_model_dir), device=torch.device("cpu"))
    with pytest.raises(UserError, match="not found"):
        attach_adapter(model, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no LoRA adapter"):
        attach_adapter(model, tmp_path / "empty")


def test_model_sources(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(UserError, match="not found"):
        resolve_source("./no/such/folder")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_source(str(tmp_path / "m.gguf")) == (str(tmp_path), {"gguf_file": "m.gguf"})
    assert resolve_source("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", {})


def test_a_gguf_file_is_parsed_once_and_loads_the_same_weights(monkeypatch, capfd, smollm2_gguf):
    """The tokenizer's and the model's loads share one parse of the .gguf (it was three, ~5 s each), and
    transformers' de-quantization bar stays off (noise at each load)."""
    import gguf
    from transformers import AutoModelForCausalLM

    from sarcasm_dpo import models

    parses = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            parses.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    models._GGUF_READER.clear()
    model, tokenizer = load_model(str(smollm2_gguf), device=torch.device("cpu"))
    assert len(parses) == 1
    assert gguf.GGUFReader is CountingReader  # put back after the load
    assert "de-quantizing" not in capfd.readouterr().err
    plain = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    assert len(parses) == 3  # transformers alone parses it for the config and the weights
    mine, theirs = model.state_dict(), plain.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_unreachable_hub_id_names_offline_route():
    with pytest.raises(UserError, match="--model PATH"):
        load_model("nobody-here/no-such-model-xyz")


def test_device_pick():
    assert pick_device().type in ("cpu", "cuda", "mps")
    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA"):
            pick_device("cuda")


def _reference_batches(scorer, encoded, skip):
    """The batches as first written: one small tensor per row, padded on the left (kept to check the fast build)."""
    order = np.argsort([-len(ids) for ids in encoded], kind="stable")
    pad_id = scorer.tokenizer.pad_token_id if scorer.tokenizer.pad_token_id is not None else scorer.tokenizer.eos_token_id
    for start in range(0, len(order), scorer.batch_size):
        idx = order[start : start + scorer.batch_size]
        width = max(len(encoded[i]) for i in idx) - skip
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids = encoded[i][skip:]
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids):] = 1
        yield idx, {"input_ids": input_ids, "attention_mask": attention}


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_batching_gives_the_first_versions_probabilities_bit_for_bit(loaded, monkeypatch, prefix_cache):
    """Built in numpy, moved in one copy, read back in one transfer: the same inputs, forward calls and numbers."""
    model, tok = loaded
    texts = [f"text {i} " * (i % 9 + 1) for i in range(150)] + TEXTS + ["", "a" * 400]
    scorer = Scorer(model, tok, batch_size=16, prefix_cache=prefix_cache)
    scorer.predict_proba(texts[:4])  # the once-per-process prefix check, outside the count below
    calls = []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(k["input_ids"].shape) or original(*a, **k))
    new = scorer.predict_proba(texts)
    new_calls, calls[:] = list(calls), []

    encoded = scorer.encode(texts)
    skip = scoring.shared_prefix_length(encoded) if prefix_cache else 0
    with torch.inference_mode():
        prefix = scorer.encode_prefix(encoded[0][:skip]) if skip else None
        old = np.zeros(len(texts))
        for (idx, ref), (idx_new, fast) in zip(_reference_batches(scorer, encoded, skip), scorer.batches(encoded, skip)):
            assert (idx == idx_new).all() and all(torch.equal(ref[k], fast[k]) for k in ref)
            logits = model(**scorer.forward_kwargs(ref, prefix)).logits[:, -1, :]
            old[idx] = torch.softmax(logits[:, [scorer.no_id, scorer.yes_id]].float(), -1)[:, 1].numpy()
    np.testing.assert_array_equal(new, old)
    assert new_calls == calls and len(calls) == -(-len(texts) // 16) + (1 if skip else 0)


def test_nothing_in_the_batch_loop_waits_for_the_device(loaded):
    """No transfer back, no Python read of a result, no index built from host data (a blocking copy on a GPU)
    in the scorer's own code: one transfer of all results at the end of the call, one copy of all inputs."""
    from torch.overrides import TorchFunctionMode

    model, tok = loaded
    scorer = Scorer(model, tok, batch_size=4)
    scorer.predict_proba(TEXTS)  # the prefix check (once per process) is not the loop
    waits = ("cpu", "item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "synchronize")
    seen: dict[str, int] = {}

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            import sys

            caller = sys._getframe(1).f_code.co_filename
            name = getattr(func, "__name__", str(func))
            if caller == scoring.__file__:
                host_index = name == "__getitem__" and any(isinstance(i, (list, np.ndarray))
                                                           for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
                if name in waits or name in ("to", "pin_memory") or host_index:
                    key = "index from host data" if host_index else name
                    seen[key] = seen.get(key, 0) + 1
            return func(*args, **(kwargs or {}))

    texts = [f"text {i} " * (i % 5 + 1) for i in range(40)]  # 10 batches
    with Count():
        scorer.predict_proba(texts)
    assert seen == {"to": 1, "cpu": 1, "numpy": 1}, seen


def test_tokenizing_in_threads_gives_the_same_ids(loaded, monkeypatch):
    model, tok = loaded
    monkeypatch.setattr(scoring.os, "sched_getaffinity", lambda _: set(range(4)), raising=False)
    texts = [f"text {i} " * (i % 9 + 1) for i in range(300)] + ["a" * 2000]  # the last one is truncated
    assert scoring._tokenizer_threads(tok, len(texts)) == 4
    scorer = Scorer(model, tok)
    assert scorer.encode(texts) == scorer._encode_chunk(texts)
    assert scoring._tokenizer_threads(tok, 40) == 1  # too few texts to share
