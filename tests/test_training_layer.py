"""The training layer's rules: callbacks in one order, one divergence rule, imports that only point down.

    PYTHONPATH=src python -m pytest -q tests/test_training_layer.py
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from sarcasm_dpo.errors import UserError
from sarcasm_dpo.training import callbacks
from sarcasm_dpo.training.resilience import StopFlag, TrainingDiverged, check_logged_loss

TRAINING = Path(__file__).resolve().parents[1] / "src" / "sarcasm_dpo" / "training"


class _Probe(callbacks.TrainerCallback):
    pass


def _kinds(found: list) -> list[str]:
    return [type(c).__name__ for c in found]


def test_stage_callbacks_keep_each_stages_order():
    validation = callbacks.ValidationCallback(None, {"gen_val": None})
    sft = callbacks.stage_callbacks(validation, lambda folder: None, save_each_epoch=False, stop_flag=StopFlag(),
                                    tracker_log=lambda *a: None, extra=[_Probe()])
    assert _kinds(sft) == ["ValidationCallback", "BarrierOnSaveCallback", "SaveStateCallback", "TrackerLogCallback",
                           "NonFiniteLossCallback", "GracefulStopCallback", "_Probe", "LogBeforeSaveCallback"]
    assert sft[0] is validation
    diagnostics = _Probe()  # the DPO diagnostics check the logged loss themselves: no second guard
    dpo = callbacks.stage_callbacks(validation, lambda folder: None, save_each_epoch=True, stop_flag=StopFlag(),
                                    diagnostics=diagnostics)
    assert _kinds(dpo) == ["ValidationCallback", "_Probe", "BarrierOnSaveCallback", "SaveStateCallback",
                           "GracefulStopCallback", "LogBeforeSaveCallback"]
    assert dpo[1] is diagnostics and dpo[3].save_each_epoch
    assert _kinds(callbacks.stage_callbacks(validation, lambda folder: None, save_each_epoch=False)) == [
        "ValidationCallback", "BarrierOnSaveCallback", "SaveStateCallback", "NonFiniteLossCallback",
        "LogBeforeSaveCallback"]


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_a_non_finite_logged_loss_is_divergence(loss):
    with pytest.raises(TrainingDiverged) as info:
        callbacks.NonFiniteLossCallback().on_log(None, type("State", (), {"global_step": 7})(), None,
                                                 logs={"loss": loss})
    assert info.value.step == 7 and "at optimizer step 7" in str(info.value) and str(loss) in str(info.value)
    check_logged_loss({"loss": 0.5}, 7)  # finite: nothing
    check_logged_loss({"train_runtime": 3.0}, 7)  # no loss in this log: nothing


def test_divergence_is_one_user_error_with_the_stages_advice(tmp_path):
    raw = TrainingDiverged("gradients became NaN or infinite", 3)
    assert isinstance(raw, UserError) and str(raw) == "the gradients became NaN or infinite at optimizer step 3"
    told = raw.explained("Training", tmp_path / "checkpoint-2", "Lower --lr.")
    assert isinstance(told, TrainingDiverged) and (told.step, told.what, told.applied) == (3, raw.what, False)
    assert str(told) == (f"Training diverged: the gradients became NaN or infinite at optimizer step 3; the bad "
                         f"update was not applied. The last good checkpoint, {tmp_path / 'checkpoint-2'}, is kept "
                         "(written before the fault). Lower --lr.")
    applied = TrainingDiverged("trainable weights became NaN or infinite", 4, applied=True)
    assert "that update was never saved or scored. No checkpoint was written before the fault." in str(
        applied.explained("DPO training", None, "x"))


def _imports(path: Path) -> set[str]:
    """The sarcasm_dpo modules `path` imports, lazily or not, as paths relative to the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = path.parent.relative_to(TRAINING.parent).parts[: max(0, 2 - node.level)]
            found.add("/".join([*base, *(node.module or "").split(".")]).strip("/"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sarcasm_dpo"):
            found.add(node.module.removeprefix("sarcasm_dpo").strip(".").replace(".", "/"))
    return found


def test_training_imports_only_point_down_and_form_no_cycle():
    modules = {p.stem: _imports(p) for p in TRAINING.glob("*.py")}
    for name, imported in modules.items():
        upward = [m for m in imported if m.split("/")[0] in ("stages", "cli")]
        assert not upward, f"training/{name}.py imports {upward}"
    inside = {name: {m.split("/")[1] for m in imported if m.startswith("training/")} for name, imported in
              modules.items()}
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        seen[name] = 1
        for other in inside.get(name, ()):
            assert seen.get(other) != 1, f"import cycle: {' -> '.join(path + [name, other])}"
            if other not in seen:
                visit(other, path + [name])
        seen[name] = 2

    for name in inside:
        if name not in seen:
            visit(name, [])
    assert {"distributed", "resilience", "checkpoints", "recipe", "callbacks", "diagnostics"} <= set(modules)
    assert "runtime" not in modules
