"""A lean training step: the same arithmetic as TRL's trainers, without the per-step overhead around it.

    PYTHONPATH=src python bench/training.py --steps 12      # stage step vs a bare PyTorch loop

`lean(trainer_class)` returns a subclass of an SFTTrainer / DPOTrainer (or any subclass of them,
e.g. one that `recipe.seeded_length_grouping` made) that composes through cooperative `super()`:

- `model.train()` only when the model is not in training mode already (the Trainer calls it on
  every micro-batch, a walk over ~1,300 modules; the first step after each validation pass,
  which puts the model in eval mode and back, still makes the real call).
- FLOP counting (`total_flos`) from a parameter count taken once: the Trainer recounts the
  parameters at every micro-batch. Same figure, 6 x tokens x non-embedding parameters.
- Gradient clipping over a cached list of the trainable parameters (frozen ones carry no
  gradient, so the norm is the same) and one health check per optimizer step, before the
  update: the Trainer's own gradient norm (NaN/inf when any gradient is), the step's loss and
  the trainable weights' norm, read with one host-device sync. A NaN/inf gradient or loss, a
  loss above LOSS_FACTOR x max(first step's loss, 1) (single-process runs: each process has its
  own loss) or a trainable-weight norm above
  WEIGHT_FACTOR x its value at the start of training raises
  `resilience.TrainingDiverged` naming the step; the optimizer never applies that update. Those two
  references (the first step's loss, the starting norm) are the run's, not the session's: they are
  written into the trainer state that each checkpoint saves (`GUARD_STATE`), and a resumed run reads
  them back, so it stops exactly where the uninterrupted run would. (The
  weight norm is the one the previous update produced; before any checkpoint, evaluation or log
  the newest update is checked as well, so exploded weights are never saved or scored.)
- TRL's extra metrics (entropy, token accuracy, DPO's rewards/logps/logits, num_tokens) are
  computed, and synced to the host, only on optimizer steps that log. `num_tokens` still counts
  every batch (on the device, added up at the logging step). What changes: a logged metric is
  the mean over the micro-batches of the logging step, not of every step since the last log
  (equal when --logging_steps is 1); a log the schedule cannot foresee (a Ctrl-C checkpoint)
  carries the loss but no TRL metrics.
- DPO with the "ref" adapter as reference: the reference log-probabilities of all micro-batches
  of a step are computed in one visit to the "ref" adapter, so the adapters are switched once
  per optimizer step (there and back) instead of once per micro-batch. The reference forward
  runs in the same mode as TRL's (training mode, under no_grad), so the numbers are the same.
"""

from __future__ import annotations

import contextlib
import math

from transformers import TrainerCallback

from .distributed import world_size
from .resilience import TrainingDiverged

LOSS_FACTOR = 10.0  # a step loss this many times max(first step's loss, 1) is an explosion, not noise
WEIGHT_FACTOR = 10.0  # trainable weights whose norm grew this many times since the start have exploded
# The guard's references, kept in TrainerState.stateful_callbacks (saved in every checkpoint's trainer_state.json;
# no callback of this name exists, so the Trainer never tries to rebuild one from it).
GUARD_STATE = "LeanStepGuard"


def lean(trainer_class: type) -> type:
    """`trainer_class` with the lean step (and, for a DPOTrainer, one reference visit per step)."""
    if trainer_class in _LEAN:
        return _LEAN[trainer_class]
    from trl import DPOTrainer

    bases = (LeanDPOMixin, LeanStepMixin, trainer_class) if issubclass(trainer_class, DPOTrainer) else \
        (LeanStepMixin, trainer_class)
    cls = type(f"Lean{trainer_class.__name__}", bases, {"__module__": __name__})
    _LEAN[trainer_class] = cls
    return cls


_LEAN: dict[type, type] = {}


def _no_gather(*_args, **_kwargs):
    """Stands in for accelerate's gathers on steps that do not log: a host zero, so TRL's `.item()` is free."""
    import torch

    return torch.zeros(())


class LeanStepMixin:
    """See the module docstring. Put it before the trainer class in the bases."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lean_params = [p for p in self.model.parameters() if p.requires_grad]
        self._lean_flops_per_token = None
        self._lean_loss = None  # the current optimizer step's loss (sum of its micro-batch losses), on the device
        self._lean_first_loss = None
        self._lean_start_norm = None
        self._lean_tokens = None  # tokens of the batches whose metrics were skipped, on the device
        self._lean_steps_per_epoch = None
        self.model_train_calls = 0  # real model.train() calls (tests count them)
        self.metric_steps: list[int] = []  # optimizer steps whose TRL metrics were computed (tests read them)
        self.add_callback(_LeanCallback(self))

    # -- model.train() once, not per micro-batch ------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        if model.training:
            # Shadow the method for this call only: a validation pass (model.eval()) in between is seen above.
            # The shadow still switches when the mode really changes, so code inside the step that puts the model
            # in eval mode and back (the shared-prefix check) gets its training mode, and its dropout, back.
            real_train = type(model).train

            def train(mode: bool = True):
                if model.training != mode:
                    real_train(model, mode)
                return model

            model.__dict__["train"] = train
        else:
            self.model_train_calls += 1
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            model.__dict__.pop("train", None)
        step_loss = loss.detach()
        self._lean_loss = step_loss if self._lean_loss is None else self._lean_loss + step_loss
        return loss

    # -- FLOPs from a parameter count taken once ------------------------------------------------------
    def floating_point_ops(self, inputs) -> int:
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._lean_flops_per_token is None:
            self._lean_flops_per_token = 6 * self.model.num_parameters(exclude_embeddings=True)
        return inputs[main_input].numel() * self._lean_flops_per_token

    # -- clipping over the cached trainable parameters, then the health check -------------------------
    def _clip_grad_norm(self, model):
        from accelerate.utils import DistributedType

        plain = self.accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU,
                                                      DistributedType.MULTI_CPU)
        if plain and not self._has_mixed_mesh_grads(model):
            return self.accelerator.clip_grad_norm_(self._lean_params, self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self._check_step(grad_norm)
        return grad_norm

    def _weight_norm(self):
        import torch

        with torch.no_grad():
            return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(self._lean_params)]))

    def _check_step(self, grad_norm=None) -> None:
        """One sync: NaN/inf gradients or loss, an exploded loss or weight norm stop the run before the update."""
        import torch

        step = self.state.global_step + 1  # the optimizer step about to be taken
        loss, self._lean_loss = self._lean_loss, None
        values = [self._weight_norm()]
        if grad_norm is not None and torch.is_tensor(grad_norm):
            values.append(grad_norm.detach().float().reshape(()))
        if loss is not None:
            values.append(loss.float().reshape(()))
        read = torch.stack([v.to(values[0].device) for v in values]).tolist()
        weights = read[0]
        grads = read[1] if grad_norm is not None and torch.is_tensor(grad_norm) else \
            (float(grad_norm) if grad_norm is not None else None)
        step_loss = read[-1] if loss is not None else None
        if grads is not None and not math.isfinite(grads):
            self._diverged(step, "gradients became NaN or infinite")
        if step_loss is not None:
            if not math.isfinite(step_loss):
                self._diverged(step, "loss became NaN or infinite")
            if self._lean_first_loss is None:
                self._lean_first_loss = step_loss
                self._keep_guard()
            limit = LOSS_FACTOR * max(self._lean_first_loss, 1.0)
            # Each process sees its own loss; one stopping alone would leave the others waiting, so with several
            # processes only what they share (gradient norm, weights) decides.
            if step_loss > limit and world_size() == 1:
                self._diverged(step, f"loss exploded to {step_loss:.4g} (more than {LOSS_FACTOR:g}x max(first step's "
                                     f"loss {self._lean_first_loss:.4g}, 1))")
        self._check_weights(weights, self.state.global_step)  # after the gradients: NaN weights make NaN gradients

    def _check_weights(self, norm: float, after_step: int) -> None:
        if self._lean_start_norm is None:
            self._lean_start_norm = norm
            self._keep_guard()
        if not math.isfinite(norm):
            self._diverged(after_step, "trainable weights became NaN or infinite", applied=True)
        if self._lean_start_norm > 0 and norm > WEIGHT_FACTOR * self._lean_start_norm:
            self._diverged(after_step, f"trainable (LoRA) weight norm exploded to {norm:.4g}, more than "
                                       f"{WEIGHT_FACTOR:g}x its {self._lean_start_norm:.4g} at the start", applied=True)

    def _keep_guard(self) -> None:
        """The guard's references into the trainer state, which every checkpoint saves (see GUARD_STATE)."""
        if self.state.stateful_callbacks is None:
            self.state.stateful_callbacks = {}
        self.state.stateful_callbacks[GUARD_STATE] = {"first_loss": self._lean_first_loss,
                                                      "start_norm": self._lean_start_norm}

    def _diverged(self, step: int, what: str, applied: bool = False):
        raise TrainingDiverged(what, step, applied=applied)

    # -- TRL's extra metrics only on steps that log ---------------------------------------------------
    def _step_logs(self, step: int) -> bool:
        """Will optimizer step `step` log? The Trainer's schedule plus the stage's forced logs (each epoch end,
        each scheduled checkpoint)."""
        args = self.args
        if step == 1 and args.logging_first_step:
            return True
        if args.logging_strategy == "steps" and step % max(1, int(args.logging_steps)) == 0:
            return True
        if self.state.max_steps and step >= self.state.max_steps:
            return True
        if self._lean_steps_per_epoch and step % self._lean_steps_per_epoch == 0:
            return True
        return args.save_strategy == "steps" and args.save_steps and step % int(args.save_steps) == 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.model.training or self._step_logs(self.state.global_step + 1):
            self._fold_tokens()
            if self.model.training and (not self.metric_steps or self.metric_steps[-1] != self.state.global_step + 1):
                # The first micro-batch of a step that logs: whatever an earlier step computed and no log took
                # (TRL's log empties the dict) is dropped now, so a logged value is the mean over its own step.
                # Dropped here, not when the in-loop log is skipped: a log the stage forces after it (at an
                # epoch's end) still finds its step's metrics.
                if hasattr(self, "_metrics"):
                    for key in list(self._metrics["train"]):
                        if key != "num_tokens":
                            del self._metrics["train"][key]
                self.metric_steps.append(self.state.global_step + 1)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self._metrics_muted(inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    @contextlib.contextmanager
    def _metrics_muted(self, inputs):
        """TRL's metric code runs on host zeros and writes into a list nobody reads; tokens are counted on the device."""
        from collections import defaultdict

        if "attention_mask" in inputs:
            count = inputs["attention_mask"].sum()
            self._lean_tokens = count if self._lean_tokens is None else self._lean_tokens + count
        metrics, tokens = self._metrics, getattr(self, "_total_train_tokens", None)
        accelerator = self.accelerator
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        accelerator.gather = accelerator.gather_for_metrics = _no_gather
        try:
            yield
        finally:
            del accelerator.gather, accelerator.gather_for_metrics
            self._metrics = metrics
            if tokens is not None:
                self._total_train_tokens = tokens

    def _fold_tokens(self) -> None:
        if self._lean_tokens is not None and hasattr(self, "_total_train_tokens"):
            counted = int(self.accelerator.gather_for_metrics(self._lean_tokens.reshape(1)).sum().item())
            self._total_train_tokens += counted // getattr(self, "_tp_size", 1)
            self._lean_tokens = None


class _LeanCallback(TrainerCallback):
    """The lean trainer's hooks at the Trainer's events (kept on the trainer, so they see its caches)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        t = self.trainer
        t._lean_params = [p for p in t.model.parameters() if p.requires_grad]  # PEFT may have changed them
        t._lean_loss = None
        # A fresh run starts without references; a resumed one has the first run's, from the checkpoint's state.
        kept = (state.stateful_callbacks or {}).get(GUARD_STATE) or {}
        t._lean_first_loss, t._lean_start_norm = kept.get("first_loss"), kept.get("start_norm")
        if train_dataloader is not None:
            batches = len(train_dataloader)
            accum = args.gradient_accumulation_steps
            t._lean_steps_per_epoch = max(batches // accum + int(batches % accum > 0), 1)

    def on_step_end(self, args, state, control, **kwargs):
        # Before anything keeps or judges these weights, check the update that was just applied.
        epoch_end = state.epoch is not None and abs(state.epoch - round(state.epoch)) < 1e-9
        if control.should_save or control.should_evaluate or control.should_log or control.should_training_stop \
                or epoch_end or state.global_step >= state.max_steps:
            t = self.trainer
            t._check_weights(float(t._weight_norm()), state.global_step)
        return control


class LeanDPOMixin:
    """DPO with TRL's "ref" adapter as reference: one visit to it per optimizer step, for all micro-batches."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batches and not self.precompute_ref_logps and self.ref_model is None and self._uses_ref_adapter() \
                and "ref_chosen_logps" not in batches[0]:
            self._add_reference_logps(batches)
        return batches, num_items

    def _uses_ref_adapter(self) -> bool:
        from peft import PeftModel

        unwrapped = self.accelerator.unwrap_model(self.model)
        return isinstance(unwrapped, PeftModel) and "ref" in unwrapped.peft_config

    def _add_reference_logps(self, batches) -> None:
        from trl.trainer.utils import use_adapter

        unwrapped = self.accelerator.unwrap_model(self.model)
        with use_adapter(unwrapped, "ref"), _adapter_pinned(unwrapped):
            for batch in batches:
                # TRL's own reference computation; its adapter switch finds "ref" active and is skipped.
                chosen, rejected = self.compute_ref_log_probs(self.model, batch)
                batch["ref_chosen_logps"], batch["ref_rejected_logps"] = chosen, rejected

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "ref_chosen_logps" not in inputs or self.precompute_ref_logps:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.precompute_ref_logps = True  # TRL then reads the reference log-probs from the batch
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self.precompute_ref_logps = False


@contextlib.contextmanager
def _adapter_pinned(model):
    """While inside, `set_adapter` to the adapter already active does nothing (PEFT walks every module)."""
    original = model.set_adapter

    def set_adapter(name, *args, **kwargs):
        if name != model.active_adapter:
            original(name, *args, **kwargs)

    model.set_adapter = set_adapter
    try:
        yield
    finally:
        del model.set_adapter
