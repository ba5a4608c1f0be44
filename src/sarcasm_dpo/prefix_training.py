"""Run the tokens several training rows share once, with gradients, and only each row's own tokens after them.

    python -c "from sarcasm_dpo.prefix_training import backbone; help(backbone)"

The scorer (scoring.py) already runs the prompts' shared prefix once per call, without gradients.
Training needs the same with gradients: LoRA changes the prefix's keys and values, so they are
computed in the autograd graph and every row's tokens attend to them through a KV cache, which
carries the gradient back to the LoRA weights exactly as the full sequence would. The pieces here
are shared by the DPO one-pass path (fast_dpo.py: each pair's prompt once, then the two answers)
and shared-prefix SFT/DPO.
"""

from __future__ import annotations

from .scoring import _base_model, _cache_entries, cache_argument


def unwrap(model):
    """The PEFT (or plain transformers) model under DDP / accelerate wrappers."""
    while hasattr(model, "module") and not hasattr(model, "get_base_model"):
        model = model.module
    return model


def backbone(model):
    """The transformer stack without the LM head (LoRA layers included, the active adapter in use)."""
    hf = _base_model(unwrap(model))
    return hf.base_model


def run_rows(model, input_ids, attention_mask, position_ids=None):
    """The keys/values of every layer for these rows, as [(keys, values), ...], in the autograd graph.

    Only the backbone runs: these positions' next-token log-probs are not needed.
    """
    from transformers import DynamicCache

    stack = backbone(model)
    cache = DynamicCache(config=getattr(stack, "config", None))
    stack(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
          **{cache_argument(model): cache})
    return [tuple(entry[:2]) for entry in _cache_entries(cache)]


def cache_from(layers, model):
    """A fresh cache holding `layers` for `model` (the forward pass appends the new tokens' keys/values to it)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(layers), config=getattr(backbone(model), "config", None))
