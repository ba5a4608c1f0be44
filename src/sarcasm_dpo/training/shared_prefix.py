"""Shared-prefix training: the tokens every row of a micro-batch starts with run once, with gradients.

    python -c "from sarcasm_dpo.training.shared_prefix import trainer_class; from trl import SFTTrainer; print(trainer_class(SFTTrainer))"

Every prompt starts with the same tokens (the chat template's system turn and our question, 45
of a GEN prompt's ~105 with SmolLM2). The scorer (scoring.py) runs them once per call without
gradients; training needs them with gradients, because LoRA changes their keys and values. So per
micro-batch the shared prefix runs once (one row, LoRA active, in the autograd graph) and its
keys/values are expanded, as views, to every row; each row then runs only its own tokens (still
right-padded, positions continuing after the prefix, attention mask = prefix ones + the row's
mask). Attention from a row's tokens to the prefix carries the gradient back through the expanded
views, where it sums over the rows: mathematically the loss and gradients of the full rows.

The prefix is read from the token ids of the batch's prompts (`scoring.shared_prefix_length`,
which leaves each prompt at least one token of its own), and never covers a trained position.
Whether this model's cache composes this way is the scorer's check (`Scorer.shared_prefix`, once
per architecture/dtype/device in a process, in eval mode without gradients); where it does not,
training says so once and runs the full rows.

TRL computes the loss from its fused LM head's per-token outputs (`model(..., labels=...,
fused_lm_head=True)`); `FastForward` hands TRL's `compute_loss` a stand-in model that makes that
call this way and gives the outputs back in TRL's own layout (zeros on the prefix, where the
labels are -100 anyway), so TRL's losses, metrics and logging are untouched. The fused head
(and fused_head.py's CPU patch that projects only the labelled positions) runs as before, on the
rows' own tokens. fast_dpo.py's one-pass DPO path uses the same stand-in, with `prompt_once_forward`
(here, beside the shared-prefix forward it builds on).

LoRA dropout: with --lora_dropout > 0 (SFT; TRL's DPO turns dropout off), the prefix's dropout
mask is drawn once per micro-batch and shared by its rows instead of once per row. Each row's loss
has the same distribution, so the expected gradient is the same; only the noise is correlated.
"""

from __future__ import annotations

from ..scoring import PrefixCache, Scorer, _base_model, _cache_entries, cache_argument, shared_prefix_length
from . import packed_pairs
from .packed_pairs import in_trl_layout, pair_layout

MODEL_KEYS = {"input_ids", "attention_mask", "use_cache"}  # what TRL's SFT and DPO batches hand the model


def unwrap(model):
    """The PEFT (or plain transformers) model under DDP / accelerate wrappers."""
    while hasattr(model, "module") and not hasattr(model, "get_base_model"):
        model = model.module
    return model


def backbone(model):
    """The transformer stack without the LM head (LoRA layers included, the active adapter in use)."""
    return _base_model(unwrap(model)).base_model


def run_rows(model, input_ids, attention_mask, position_ids=None, start=None):
    """The keys/values of every layer after these rows, [(keys, values), ...], in the autograd graph.

    Only the backbone runs (these positions' next-token log-probs are not needed). `start`: a cache
    the rows continue from (a shared prefix); its keys/values come first in the result.
    """
    from transformers import DynamicCache

    stack = backbone(model)
    cache = start if start is not None else DynamicCache(config=getattr(stack, "config", None))
    stack(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
          **{cache_argument(model): cache})
    return [tuple(entry[:2]) for entry in _cache_entries(cache)]


def cache_from(layers, model):
    """A fresh cache holding `layers` for `model` (the forward pass appends the new tokens' keys/values to it)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(layers), config=getattr(backbone(model), "config", None))


def continuing(mask, length: int):
    """(attention mask, position ids) for right-padded rows that follow `length` shared prefix tokens."""
    import torch

    rows, width = mask.shape
    ones = torch.ones((rows, length), dtype=mask.dtype, device=mask.device)
    positions = torch.arange(length, length + width, device=mask.device)[None].expand(rows, -1)
    return torch.cat([ones, mask], 1), positions


def left_pad(values, length: int):
    """Per-token outputs of the rows' own tokens back in the full rows' layout: zeros on the prefix."""
    import torch

    if values is None or not length:
        return values
    return torch.cat([values.new_zeros((values.shape[0], length)), values], 1)


def prefix_forward(model, input_ids, attention_mask, labels, prefix: PrefixCache):
    """TRL's fused-head call on full right-padded rows, with their first `prefix.length` tokens taken from `prefix`."""
    from trl.trainer.utils import FusedCausalLMOutput

    k = prefix.length
    mask, positions = continuing(attention_mask[:, k:], k)
    out = model(input_ids=input_ids[:, k:], attention_mask=mask, position_ids=positions, labels=labels[:, k:],
                fused_lm_head=True, use_cache=False, **{cache_argument(model): prefix.cache_for(input_ids.shape[0])})
    fields = {name: left_pad(getattr(out, name), k) for name in
              ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")}
    return FusedCausalLMOutput(loss=out.loss, aux_loss=out.aux_loss, **fields)


def prompt_once_forward(model, input_ids, attention_mask, labels, prefix_of=None):
    """TRL's fused-head output for a [chosen rows; rejected rows] batch, each prompt run once.

    `labels` is `input_ids` with -100 outside the answers (TRL's layout: right-padded rows, answer
    right after the prompt). Falls back to the full rows when the batch is not laid out that way.
    `prefix_of` (SharedPrefixTraining): the prompts' shared prefix runs once too.
    """
    import torch

    layout = pair_layout(input_ids, labels)
    if layout is None:  # not two rows per pair on one prompt: TRL's full-row call
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True, use_cache=False)
    width = input_ids.shape[1]
    pairs, prompt_len, answer_len, answer = layout
    steps = torch.arange(width, device=input_ids.device)

    # 1. Each pair's prompt but its last token, once: B right-padded rows through the backbone, with gradients.
    head_len = prompt_len[:pairs] - 1
    head_width = int(head_len.max())
    head_mask = (steps[:head_width][None] < head_len[:, None]).long()
    heads = input_ids[:pairs, :head_width]
    prefix = prefix_of(prompt_ids(heads, labels[:pairs], drop_last=1)) if prefix_of else None
    if prefix is None:
        layers = run_rows(model, heads, head_mask)
    else:  # the heads' shared prefix once more: [prefix | each head's own tokens]
        k = prefix.length
        mask, positions = continuing(head_mask[:, k:], k)
        layers = run_rows(model, heads[:, k:], mask, positions, start=prefix.cache_for(pairs))
    layers = [(torch.cat([k, k]), torch.cat([v, v])) for k, v in layers]  # chosen rows, then rejected rows

    # 2. Every row's [last prompt token, answer tokens but the last], scored against its answer tokens.
    tail_width = int(answer_len.max())
    valid = steps[:tail_width][None] < answer_len[:, None]
    at = (prompt_len - 1)[:, None] + steps[:tail_width][None]  # positions in the full row
    tail_ids = input_ids.gather(1, at.clamp(max=width - 1)).masked_fill(~valid, 0)
    tail_labels = input_ids.gather(1, (at + 1).clamp(max=width - 1)).masked_fill(~valid, -100)
    mask = torch.cat([head_mask.repeat(2, 1), valid.long()], 1)
    out = model(input_ids=tail_ids, attention_mask=mask, position_ids=at, shift_labels=tail_labels,
                fused_lm_head=True, use_cache=False, **{cache_argument(model): cache_from(layers, model)})

    # 3. Back into TRL's layout.
    return in_trl_layout(out, answer, lambda values: values[valid])


class FastModel:
    """Stands in for the model in TRL's `model(..., labels=..., fused_lm_head=True)` call.

    `prompt_once`: a DPO batch of [chosen rows; rejected rows], each pair's prompt run once
    (prompt_once_forward, used by fast_dpo.OnePassPairs). `prefix_of`: ids -> PrefixCache or None, the shared-prefix
    path. Every other call, and every attribute, goes to the model itself.
    """

    def __init__(self, model, *, prompt_once: bool = False, prefix_of=None, packed: bool = False):
        self.model = model
        self.prompt_once = prompt_once
        self.prefix_of = prefix_of
        self.packed = packed

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, fused_lm_head: bool = False, labels=None, **kwargs):
        if args or not fused_lm_head or labels is None or set(kwargs) - MODEL_KEYS or "input_ids" not in kwargs:
            return self.model(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        input_ids, attention_mask = kwargs["input_ids"], kwargs.get("attention_mask")
        if attention_mask is None:
            return self.model(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        if self.prompt_once:
            if self.packed:  # one call for the whole micro-batch where this model's attention allows it
                if packed_pairs.packing_works(self.model, input_ids, attention_mask, labels, prompt_once_forward):
                    out = packed_pairs.packed_pairs_forward(self.model, input_ids, attention_mask, labels,
                                                            shared_prefix_length if self.prefix_of else None)
                    if out is not None:
                        return out
            return prompt_once_forward(self.model, input_ids, attention_mask, labels, prefix_of=self.prefix_of)
        prefix = self.prefix_of(prompt_ids(input_ids, labels)) if self.prefix_of else None
        if prefix is None:
            return self.model(fused_lm_head=True, labels=labels, **kwargs)
        return prefix_forward(self.model, input_ids, attention_mask, labels, prefix)


def prompt_ids(input_ids, labels, drop_last: int = 0) -> list[list[int]]:
    """Each row's tokens before its first trained position (less `drop_last`): where a shared prefix may lie."""
    first = (labels != -100).int().argmax(-1).tolist()
    return [row[: max(n - drop_last, 0)] for row, n in zip(input_ids.tolist(), first)]


class FastForward:
    """Trainer mixin: TRL's compute_loss (and DPO's reference pass) get a FastModel when a fast path is on.

    Fast-path mixins add their options by extending `_fast_forward_options` (cooperative super()).
    """

    def _fast_forward_options(self) -> dict:
        return {}

    def _fast_model(self, model):
        # Gradient checkpointing drops a KV cache inside checkpointed layers; MoE aux losses need every token's
        # router logits from one call. Both keep TRL's full-row call.
        if getattr(self.args, "gradient_checkpointing", False) or getattr(self, "aux_loss_enabled", False):
            return model
        options = self._fast_forward_options()
        return FastModel(model, **options) if options else model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(self._fast_model(model), inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def compute_ref_log_probs(self, model, inputs):
        # DPO only: TRL calls `model` under the "ref" adapter here (before training, with the reference precomputed).
        return super().compute_ref_log_probs(self._fast_model(model), inputs)


class SharedPrefixTraining(FastForward):
    """Trainer mixin (SFT or DPO): the micro-batch's shared prefix runs once, with gradients."""

    _prefix_verdict: bool | None = None  # the scorer's check, asked once per trainer

    def _fast_forward_options(self) -> dict:
        return {**super()._fast_forward_options(), "prefix_of": self._shared_prefix}

    def _shared_prefix(self, prompts: list[list[int]]) -> PrefixCache | None:
        """The prefix's keys/values (with gradients, the active adapter), or None: no prefix, or no composing cache."""
        import torch

        length = shared_prefix_length(prompts)
        if length < 1:
            return None
        model = unwrap(self.model)
        scorer = self.__dict__.get("_prefix_scorer")
        if scorer is None or scorer.model is not model:
            scorer = self._prefix_scorer = Scorer(model, self.processing_class)
        if self._prefix_verdict is None:
            was_training = model.training
            model.eval()  # no dropout: both paths of the check must see the same weights
            try:
                with torch.no_grad():
                    self._prefix_verdict = scorer.shared_prefix(prompts, length) is not None
            finally:
                model.train(was_training)
            if not self._prefix_verdict:
                print(f"Note: training {type(_base_model(model)).__name__} on full rows: its KV cache does not "
                      "compose with a shared prefix (same results, more compute).")
        return scorer.encode_prefix(prompts[0][:length]) if self._prefix_verdict else None


_CLASSES: dict[tuple, type] = {}


def trainer_class(base: type, *mixins: type) -> type:
    """`base` with `mixins` in front (in that order); the same class object for the same request."""
    if not mixins:
        return base
    key = (base, mixins)
    if key not in _CLASSES:
        _CLASSES[key] = type("".join(m.__name__ for m in mixins) + base.__name__, (*mixins, base), {})
    return _CLASSES[key]
