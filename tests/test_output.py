"""What a run prints: its own lines stay clear of the progress bars, and library bars that say nothing stay off."""

from __future__ import annotations

import torch

from sarcasm_dpo import cli
from sarcasm_dpo.training import distributed
from sarcasm_dpo.stages import sft
from test_sft import settings, toy_frame


def test_say_prints_through_tqdm(monkeypatch):
    from tqdm.auto import tqdm

    written = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, message, *a, **k: written.append(message)))
    distributed.say("[eval] step 3")
    assert written == ["[eval] step 3"]


def test_a_training_stage_prints_its_lines_through_the_bar_safe_printer(tiny_model_dir, tmp_path, monkeypatch):
    lines = []
    monkeypatch.setattr(sft, "say", lines.append)
    toy_frame(16, 1).to_csv(tmp_path / "train.csv", index=False)
    toy_frame(8, 2).to_csv(tmp_path / "val.csv", index=False)
    sft.run(settings(tiny_model_dir, tmp_path / "train.csv", tmp_path / "val.csv", tmp_path / "o", epochs=1))
    assert any(line.startswith("[eval] step") for line in lines), lines


def test_the_loading_weights_bar_is_off(tiny_model_dir, capfd):
    from transformers.utils import logging as hf_logging

    from sarcasm_dpo.models import load_base_model

    previous = hf_logging.set_tqdm_hook(None)
    try:
        cli.quiet_known_noise()
        capfd.readouterr()
        load_base_model(str(tiny_model_dir), torch.device("cpu"))
        assert "Loading weights" not in capfd.readouterr().err
        hf_logging.set_tqdm_hook(None)
        load_base_model(str(tiny_model_dir), torch.device("cpu"))
        assert "Loading weights" in capfd.readouterr().err  # the check can fail: without the hook the bar is there
    finally:
        hf_logging.set_tqdm_hook(previous)


def test_warnings_print_clear_of_the_bars(monkeypatch):
    import warnings

    from tqdm.auto import tqdm

    written = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, message, *a, **k: written.append(message)))
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # put back after the test
    cli.route_warnings_clear_of_bars()  # what entry_point does before main()
    assert warnings.showwarning is cli._show_warning_clear_of_bars
    with warnings.catch_warnings():  # without record=True it keeps the installed showwarning
        warnings.simplefilter("always")
        warnings.warn("lr looks odd", UserWarning)
    assert len(written) == 1 and "UserWarning: lr looks odd" in written[0]
