"""DPO's diagnostics: how far the policy moved from the SFT reference, and whether it learned the preferences.

DPODiagnosticsCallback measures KL to the reference, the reward ratio, the adapter's drift and
prediction flips; DPOValidationCallback puts them beside each validation record; `kl_verdict()` /
`ratio_verdict()` turn the end-of-training figures into advice. The exact definitions follow.

    sarcasm-dpo dpo --sft_model models/sft --diagnostics_steps 5 --no_wandb   # KL/drift/flips every 5 steps
"""

from __future__ import annotations

import math
import time
from typing import Callable

from transformers import TrainerCallback

from ..scoring import Scorer
from ..metrics import fmt
from .callbacks import ValidationCallback
from .resilience import check_logged_loss, validation_scoring

# The definitions of every diagnostic, one copy: written into each DPO run's records (the summary and the
# epoch metrics) as they are here. All are computed from the models, never estimated from text. Why these:
# KL is read at the answer position because that is where the scorer reads Yes/No; the reward ratio
# (the geometric mean of how many times more the policy prefers chosen over rejected than the
# reference did) stays well defined when the rewards are negative, unlike rewards/chosen over
# rewards/rejected; the LoRA scaling cancels in drift_delta_w.
DEFINITIONS = {
    "dpo/kl": "Exact KL(policy || reference) of the next-token distribution at the answer position, over the full "
              "vocabulary, mean over the probe prompts (nats). Reference = frozen SFT adapter.",
    "dpo/kl_max": "Largest per-prompt KL on the probe set.",
    "dpo/logratio_chosen": "Mean log pi(chosen|x) - log pi_ref(chosen|x) over the logged pairs (rewards/chosen / beta).",
    "dpo/logratio_rejected": "Mean log pi(rejected|x) - log pi_ref(rejected|x) (rewards/rejected / beta).",
    "dpo/reward_ratio": "exp(rewards/margins / beta): geometric mean over the logged pairs of "
                        "[pi/pi_ref](chosen) / [pi/pi_ref](rejected); 1 = no preference learned beyond SFT.",
    "dpo/drift": "||theta - theta_sft|| / ||theta_sft|| over the LoRA parameters.",
    "dpo/drift_delta_w": "sqrt(sum ||B A - B0 A0||^2 / sum ||B0 A0||^2) over the LoRA modules: drift of the weight update.",
    "dpo/flip_rate": "Share of probe prompts whose P(sarcastic) >= 0.5 decision differs from the reference's.",
    "dpo/probe_p_sarcastic": "Mean P(sarcastic) of the policy on the probe prompts.",
    "rewards/*": "TRL: beta * log-ratio of chosen / rejected, their margin, and the share of pairs with margin > 0.",
}

KL_HEALTHY = (0.5, 2.0)  # nats; the original guide's "sweet spot" for the KL to the reference
RATIO_HEALTHY = 1.2  # the original guide: a reward ratio above this means preferences are learned

# Why the advice names no direction for beta: it scales the loss's gradient (early on, a larger beta
# moves the model faster: the original guide's "raise beta when KL is low") and it is the weight of
# the pull back to the reference (at convergence, a larger beta stays closer). Which wins depends on
# the run, so the advice points at the measurement.
_BETA_BOTH_WAYS = ("Beta acts both ways (a larger one takes bigger early steps but pulls harder back to the "
                   "reference), so compare values with --beta_sweep rather than guessing its direction.")
ADVICE = {
    "kl_too_high": ("KL to the SFT reference is {value:.4g}, above {high:g}: DPO is moving far from what SFT "
                    "taught. Lower --lr or train for fewer epochs. " + _BETA_BOTH_WAYS),
    "kl_too_low": ("KL to the SFT reference is {value:.4g}, below {low:g}: DPO has barely changed the SFT model. "
                   "Train longer or with a higher --lr. " + _BETA_BOTH_WAYS),
    "ratio_weak": ("Reward ratio is {value:.3f}, not above {threshold:g}: the policy prefers the chosen answers "
                   "little more than the reference did. Train longer, use better pairs (`sarcasm-dpo mine`), or compare "
                   "betas with --beta_sweep."),
}


def reward_ratio(margin: float | None, beta: float) -> float | None:
    """exp(margin / beta): the odds ratio of chosen over rejected, relative to the reference."""
    if margin is None or not math.isfinite(margin):
        return None
    return math.exp(min(margin / beta, 700.0))  # 700: stay finite in float64


def kl_verdict(kl: float | None, healthy: tuple[float, float] = KL_HEALTHY) -> dict:
    """{"value", "range", "verdict" (healthy/too_low/too_high/unknown), "advice"}."""
    low, high = healthy
    if kl is None or not math.isfinite(kl):
        return {"value": kl, "range": list(healthy), "verdict": "unknown", "advice": None}
    verdict = "too_high" if kl > high else "too_low" if kl < low else "healthy"
    advice = ADVICE.get(f"kl_{verdict}", "").format(value=kl, low=low, high=high) or None
    return {"value": kl, "range": list(healthy), "verdict": verdict, "advice": advice}


def ratio_verdict(ratio: float | None, threshold: float = RATIO_HEALTHY) -> dict:
    """{"value", "threshold", "verdict" (healthy/weak/unknown), "advice"}."""
    if ratio is None or not math.isfinite(ratio):
        return {"value": ratio, "threshold": threshold, "verdict": "unknown", "advice": None}
    healthy = ratio > threshold
    return {"value": ratio, "threshold": threshold, "verdict": "healthy" if healthy else "weak",
            "advice": None if healthy else ADVICE["ratio_weak"].format(value=ratio, threshold=threshold)}


def lora_weights(model, adapter: str = "default", copy: bool = True) -> dict:
    """One adapter's LoRA parameters in float, keyed by name without the adapter name, on the model's
    device (a snapshot when `copy`, else views of the live weights): never copied to the host per log."""
    marker = f".{adapter}."
    return {name.replace(marker, "."): (p.detach().float().clone() if copy else p.detach().float())
            for name, p in model.named_parameters() if "lora_" in name and marker in name}


def weight_drift(now: dict, start: dict) -> dict:
    """Relative change of the LoRA parameters and of the weight update B@A (see the definitions above).
    Summed on the device; one read back to the host."""
    import torch

    sums = []
    for key, w0 in start.items():
        sums += [((now[key] - w0) ** 2).sum(), (w0 ** 2).sum()]
    for key, a0 in start.items():
        b_key = key.replace("lora_A.weight", "lora_B.weight")
        if not key.endswith("lora_A.weight") or b_key not in start:
            continue
        d0 = start[b_key] @ a0
        sums += [((now[b_key] @ now[key] - d0) ** 2).sum(), (d0 ** 2).sum()]
    values = torch.stack(sums).double().cpu().view(-1, 2) if sums else torch.zeros(0, 2, dtype=torch.float64)
    num, den = values[:len(start)].sum(0).tolist()
    dnum, dden = values[len(start):].sum(0).tolist()
    return {"dpo/drift": math.sqrt(num / den) if den > 0 else None,
            "dpo/drift_delta_w": math.sqrt(dnum / dden) if dden > 0 else None}


class DPODiagnosticsCallback(TrainerCallback):
    """KL to the reference, reward ratio, drift and prediction flips.

    TRL's training metrics (and the reward ratio from them) are recorded at every logging step;
    KL, drift and flips, which cost a pass over the probe set, at every evaluation (through
    DPOValidationCallback), at step 0, on the logging steps that are multiples of
    `diagnostics_steps` (0: about four times per epoch) and at the last logged step.

    Built after DPOTrainer, on the PeftModel that carries the trained adapter ("default") and
    TRL's frozen copy of the SFT adapter ("ref"). The starting LoRA weights are copied here, before
    any checkpoint is loaded, so drift is always measured from SFT. `records` holds one flat dict
    per logging step (plus step 0), with the same keys that go to W&B. A NaN/inf logged loss raises
    resilience.TrainingDiverged (the lean trainer checks gradients, loss and weights at every step,
    before the update).
    """

    def __init__(self, model, tokenizer, probe_texts, *, beta: float, policy_adapter: str = "default",
                 reference_adapter: str = "ref", batch_size: int = 16, max_text_tokens: int = 256,
                 diagnostics_steps: int = 0, log: Callable[[dict, int], None] | None = None,
                 printer: Callable[[str], None] = print):
        self.scorer = Scorer(model, tokenizer, batch_size=batch_size, max_text_tokens=max_text_tokens)
        self.encoded = self.scorer.encode(list(probe_texts))
        self.beta = beta
        self.policy_adapter = policy_adapter
        self.reference_adapter = reference_adapter
        self.start = lora_weights(model, policy_adapter)  # on the device, copied once
        self.diagnostics_steps = diagnostics_steps
        self._every = max(1, diagnostics_steps)  # set at train begin when diagnostics_steps is 0
        self.log = log
        self.printer = printer
        self.records: list[dict] = []
        self.seconds = 0.0
        self._ref_logprobs = None  # the reference is frozen: its probe distribution is computed once
        self._cache: tuple[int, dict] | None = None

    # -- state for resume: the records so far travel with each checkpoint ---------------------
    def state_dict(self) -> dict:
        return {"records": self.records}

    def load_state_dict(self, state: dict) -> None:
        self.records = list(state.get("records", []))

    # -- measurements -------------------------------------------------------------------------
    def _answer_logprobs(self, model):
        """(n, vocab) log-softmax of the next token at the answer position, in probe order."""
        import torch

        # The scorer's own model call (shared-prefix cache included), with the whole vocabulary kept.
        # The prefix is run again each time: the adapter in use changes its keys/values.
        self.scorer.model = model
        rows = [None] * len(self.encoded)
        batches, prefix = self.scorer.plan_encoded(self.encoded)
        for idx, inputs in batches:
            logits = self.scorer.next_token_logits(inputs, prefix)
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, i in enumerate(idx):
                rows[i] = logprobs[row]
        return torch.stack(rows)

    def measure(self, model, step: int | None = None) -> dict:
        """KL, flips and drift of the model as it is now (cached per step: weights change only between steps)."""
        import torch
        from trl.trainer.utils import use_adapter

        if step is not None and self._cache and self._cache[0] == step:
            return dict(self._cache[1])
        start = time.perf_counter()
        model = getattr(model, "module", model)  # DDP wrapper
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), validation_scoring():  # sized by --eval_batch_size, like validation
                policy = self._answer_logprobs(model)
                if self._ref_logprobs is None:
                    with use_adapter(model, self.reference_adapter):
                        self._ref_logprobs = self._answer_logprobs(model)
        finally:
            if was_training:
                model.train()
        ref = self._ref_logprobs
        kl = (policy.exp() * (policy - ref)).sum(-1).clamp(min=0.0)  # tiny negatives are float error
        no_id, yes_id = self.scorer.no_id, self.scorer.yes_id
        says_yes_policy = policy[:, yes_id] >= policy[:, no_id]  # P(sarcastic) >= 0.5, as the scorer decides
        says_yes_ref = ref[:, yes_id] >= ref[:, no_id]
        out = {"dpo/kl": float(kl.mean()), "dpo/kl_max": float(kl.max()),
               "dpo/flip_rate": float((says_yes_policy != says_yes_ref).float().mean()),
               "dpo/probe_p_sarcastic": float(torch.sigmoid(policy[:, yes_id] - policy[:, no_id]).mean()),
               **weight_drift(lora_weights(model, self.policy_adapter, copy=False), self.start)}
        self.seconds += time.perf_counter() - start
        if step is not None:
            self._cache = (step, dict(out))
        return out

    def diagnostic_step(self, state) -> bool:
        """KL, drift and flips at this logged step? Every `diagnostics_steps`, the last step, or when an
        evaluation at this step measured them already (cached)."""
        step = state.global_step
        cached = self._cache is not None and self._cache[0] == step
        return cached or step % self._every == 0 or step >= state.max_steps

    # -- events -------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if not self.diagnostics_steps:  # about four times per epoch
            batches = len(train_dataloader) if train_dataloader is not None else 0
            per_epoch = max(1, math.ceil(batches / max(1, args.gradient_accumulation_steps)))
            self._every = max(1, round(per_epoch / 4))
        if state.global_step == 0 and not self.records:
            record = {"step": 0, "epoch": 0.0, **self.measure(model, 0)}
            self.records.append(record)
            if self.log:
                self.log({k: v for k, v in record.items() if k not in ("step", "epoch") and v is not None}, 0)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:  # the end-of-training totals, or an evaluation log
            return
        check_logged_loss(logs, state.global_step)  # before a NaN is recorded: the batch metrics stay clean
        record = {"step": int(state.global_step), "epoch": round(float(state.epoch or 0.0), 4)}
        for key in ("loss", "learning_rate", "grad_norm", "entropy"):
            if key in logs:
                record[f"train/{key}"] = logs[key]
        for key, value in logs.items():  # TRL's own metrics keep their names (rewards/margins, ...)
            if key.startswith(("rewards/", "logps/", "logits/")):
                record[key] = value
        if "rewards/margins" in logs:
            record["dpo/reward_ratio"] = reward_ratio(logs["rewards/margins"], self.beta)
        for side in ("chosen", "rejected"):
            if f"rewards/{side}" in logs:
                record[f"dpo/logratio_{side}"] = logs[f"rewards/{side}"] / self.beta
        if self.diagnostic_step(state):
            record.update(self.measure(model, state.global_step))
        self.records.append(record)
        if self.log:
            self.log({k: v for k, v in record.items() if k not in ("step", "epoch") and v is not None},
                     record["step"])
        self.printer(describe_dpo_record(record))


def describe_dpo_record(r: dict) -> str:
    def f(key, spec=".3f"):
        return fmt(r.get(key), spec)

    return (f"[dpo] step {r['step']}: loss {f('train/loss', '.4f')}  margin {f('rewards/margins')}  "
            f"acc {f('rewards/accuracies', '.2f')}  ratio {f('dpo/reward_ratio', '.2f')}  KL {f('dpo/kl', '.4f')}  "
            f"drift {f('dpo/drift')}  flips {f('dpo/flip_rate', '.2f')}")


class DPOValidationCallback(ValidationCallback):
    """ValidationCallback whose every evaluation record also carries the DPO diagnostics at that step,
    so the epoch metrics show F1 beside KL, drift and flips of the very same weights."""

    def __init__(self, *args, diagnostics: DPODiagnosticsCallback | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.diagnostics = diagnostics

    def evaluate(self, model, step: int, epoch: float) -> dict:
        record = super().evaluate(model, step, epoch)
        if self.diagnostics is not None:
            record["diagnostics"] = self.diagnostics.measure(model, step)
        return record
