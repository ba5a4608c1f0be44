"""The training recipe SFT and DPO share: the Trainer's arguments, its data order, running it, its record.

- `trainer_arguments()`: the TrainingArguments both stages use (optimizer, schedule, precision,
  logging, seeds); each stage adds its loss, saving and memory settings.
- `seeded_length_grouping()`: length-grouped batches whose order is a function of (seed, epoch)
  alone, and no training past a stop a checkpoint recorded (`training_stopped`), so a --resume
  retraces the uninterrupted run.
- `run_trainer()`: trainer.train(), from a checkpoint if given, with the progress bar closed on
  any early end; `run_record()`: what a training summary says about how the run went.

    python -c "from sarcasm_dpo.training.recipe import trainer_arguments; help(trainer_arguments)"
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from .callbacks import LossProgressCallback
from .distributed import say

# -- what the trainer is given and what it shows --------------------------------------------------------


def run_record(trainer, device, resume_from: Path | None, used: dict | None, timings: dict) -> dict:
    """What a training summary says about how the run went, beside the stage's own results."""
    import peft
    import torch
    import transformers
    import trl

    return {
        "device": str(device),
        "dtype": str(next(trainer.model.parameters()).dtype).replace("torch.", ""),
        "resumed_from": str(resume_from) if resume_from else None,
        # What training really used: --auto_find_batch_size may have shrunk the batch; processes > 1 under DDP.
        "batch": used,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "peft": peft.__version__},
    }


def trainer_arguments(s, model, ckpt_dir: Path) -> dict:
    """The TrainingArguments SFT and DPO share; each stage adds its loss, saving and memory settings."""
    import torch

    return dict(
        output_dir=str(ckpt_dir),
        num_train_epochs=s.epochs,
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        auto_find_batch_size=False,  # ours (train_within_memory) also keeps the effective batch
        optim="adamw_torch",
        learning_rate=s.lr,
        lr_scheduler_type="cosine",
        warmup_steps=s.warmup_ratio,  # transformers 5: a value below 1 is a share of all steps
        # The model was loaded in bf16 only where the GPU does bf16 (models.pick_dtype); fp32 elsewhere.
        bf16=model.dtype == torch.bfloat16,
        fp16=False,
        use_cpu=next(model.parameters()).device.type == "cpu",
        max_length=s.max_length,
        logging_steps=s.logging_steps,
        logging_first_step=True,  # DPO: step 1's rewards are measured before any update, exactly 0
        logging_nan_inf_filter=False,  # show a NaN loss as NaN; the stage's divergence check stops the run
        save_total_limit=2,  # the newest may be half-written when killed; the one before it is whole
        eval_strategy="no",  # validation is the F1 of the scorer, in the stage's validation callback
        report_to="none",  # W&B goes through our Tracker
        seed=s.seed,
        data_seed=s.seed,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every trainable (LoRA) parameter gets a gradient at every step
        # --compile: a few padded lengths instead of one shape per batch, so torch.compile does not recompile each step
        **({"torch_compile": True, "pad_to_multiple_of": COMPILE_PAD} if getattr(s, "compile", False) else {}),
    )


COMPILE_PAD = 64  # tokens; sequence lengths are rounded up to a multiple of this under --compile


def run_trainer(trainer, resume_from: Path | None):
    """trainer.train(), from `resume_from` if given; whatever ends it early closes the progress bar first."""
    try:
        return trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except BaseException:
        close_progress_bars(trainer)
        raise


def close_progress_bars(trainer) -> None:
    """So that the message after a failed or stopped run starts on a line of its own."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, LossProgressCallback) and callback.bar is not None:
            callback.bar.close()
            callback.bar = None


# -- data order that survives a resume ------------------------------------------------------------------


def seeded_length_grouping(trainer_class: type) -> type:
    """`trainer_class` whose --resume retraces the uninterrupted run: length-grouped batches come in an
    order fixed by (seed, epoch) alone, and a run resumed from a checkpoint written after training had
    decided to stop trains no further.

    transformers' LengthGroupedSampler shuffles with the global torch RNG at the start of each
    epoch; after a --resume that RNG is not where the uninterrupted run had it (the checkpoint's RNG
    state is restored only after the loader is built), so from the second epoch on a resumed run
    would see the examples in another order. Seeding each epoch's shuffle with seed + epoch makes
    the order a pure function of the settings, so a resumed run retraces the uninterrupted one.

    The Trainer forgets a stop on resume (on_train_begin clears it) and would train on from the
    checkpoint's step: past an early stop (one more epoch, evaluation and perhaps a better adapter),
    or one step past the last when that falls inside an epoch (fractional --epochs). Each checkpoint
    records the decision (`training_stopped`); resumed from one that holds it, the run keeps it and
    goes straight on to the end of training (on_train_end) and the stage's save, as the uninterrupted
    run did after writing that checkpoint.
    """
    from transformers.trainer_pt_utils import LengthGroupedSampler

    if trainer_class in _SEEDED:
        return _SEEDED[trainer_class]

    class Seeded(trainer_class):
        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if type(sampler) is not LengthGroupedSampler:
                return sampler
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSeededLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths, seed=seed,
                                                   epoch_of=lambda: math.floor((self.state.epoch or 0) + 1e-6))

        def _run_epoch(self, *args, **kwargs):
            # Within one run the loop ends as soon as a stop is decided, so a stop found here, before
            # an epoch runs, is the one the checkpoint this run resumed from recorded.
            if training_stopped(self.state):
                self.control.should_training_stop = True
                if self.is_world_process_zero():
                    say(f"Training had stopped at step {self.state.global_step} when that checkpoint was written "
                        "(early stopping, or its last step): nothing more to train, saving its results.")
                return None
            return super()._run_epoch(*args, **kwargs)

    Seeded.__name__ = Seeded.__qualname__ = f"Seeded{trainer_class.__name__}"
    _SEEDED[trainer_class] = Seeded
    return Seeded


_SEEDED: dict[type, type] = {}


def training_stopped(state) -> bool:
    """Had training decided to stop (early stopping, its last step) when the checkpoint `state` was read from
    was written? The Trainer records its TrainerControl in every checkpoint's trainer_state.json; a fresh
    run's state holds the control it starts with (no stop), as do checkpoints of versions without it."""
    recorded = (getattr(state, "stateful_callbacks", None) or {}).get("TrainerControl")
    if isinstance(recorded, list):  # the Trainer keeps a list when a class is registered twice
        recorded = recorded[-1] if recorded else None
    args = recorded.get("args") if isinstance(recorded, dict) else None
    return bool(isinstance(args, dict) and args.get("should_training_stop"))


def _length_grouped_sampler_class():
    from transformers.trainer_pt_utils import LengthGroupedSampler

    return LengthGroupedSampler


class EpochSeededLengthGroupedSampler(_length_grouped_sampler_class()):
    """Length-grouped indices shuffled by a generator seeded with seed + the epoch being started
    (`epoch_of()` reads it from the trainer state, which a resume restores)."""

    def __init__(self, batch_size: int, *, lengths: list[int], seed: int, epoch_of: Callable[[], int]):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch_of = epoch_of

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator()
        generator.manual_seed(int(self.seed) + int(self.epoch_of()))
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))

