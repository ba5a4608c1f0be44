"""--compile: torch.compile of the model with padded lengths trains like the eager model (tiny model, CPU)."""

from __future__ import annotations

import shutil

import pytest
from test_lean_trainer import _logged, _sft_trainer


@pytest.mark.slow  # inductor builds CPU kernels: ~3 minutes on 2 cores
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="inductor needs a C compiler to build CPU kernels")
def test_compiled_sft_trains_like_eager(tiny_model_dir, tmp_path, monkeypatch):
    eager = _sft_trainer(tiny_model_dir, tmp_path / "eager", False, monkeypatch, lora_dropout=0.0)
    eager.train()
    compiled = _sft_trainer(tiny_model_dir, tmp_path / "compiled", False, monkeypatch, lora_dropout=0.0,
                            compile=True)
    assert compiled.args.torch_compile and compiled.args.pad_to_multiple_of == 64
    batch = next(iter(compiled.get_train_dataloader()))
    assert batch["input_ids"].shape[1] % 64 == 0  # the padded lengths that keep the compiled shapes few
    try:
        compiled.train()
    except Exception as exc:  # noqa: BLE001 - a toolchain that cannot build kernels is a skip, not a failure
        if "inductor" in repr(exc).lower() or "compile" in type(exc).__name__.lower():
            pytest.skip(f"torch.compile cannot build here: {type(exc).__name__}: {str(exc)[:200]}")
        raise
    a, b = _logged(compiled), _logged(eager)
    assert [e["step"] for e in a] == [e["step"] for e in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-3, rel=1e-3)
    assert a[-1]["loss"] < a[0]["loss"] + 1.0  # it trains (finite, not diverging)
