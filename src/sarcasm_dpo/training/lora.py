"""Which layers of a model LoRA may adapt, by PEFT's own rules: the one check of --lora_targets (SFT's).

PEFT adapts Linear layers, transformers' Conv1D (GPT-2's c_attn, c_proj, c_fc), Embedding, Conv1d/2d/3d
and MultiheadAttention; a target is a module's full name or a dotted suffix of it, or `all-linear` alone
(every linear layer but the output layer). The output layer, and an input embedding tied to it, are
refused: TRL reads the output layer's weight directly, and an adapter on a tied embedding would, merged
at export, change the output layer too.

    python -c "from sarcasm_dpo.training.lora import check_lora_targets; help(check_lora_targets)"
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every Linear / Conv1D layer but the output layer


def linear_kinds() -> tuple[type, ...]:
    """What PEFT's all-linear takes: torch's Linear and transformers' Conv1D (GPT-2's c_attn, c_proj, c_fc)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return torch.nn.Linear, Conv1D


def lora_layers(model) -> dict[str, Any]:
    """{module name: module} of every layer PEFT's LoRA can adapt (the types of peft.tuners.lora.layer's
    dispatch_default): the linear kinds, Embedding, Conv1d/2d/3d and MultiheadAttention."""
    import torch

    kinds = (*linear_kinds(), torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
             torch.nn.MultiheadAttention)
    return {name: module for name, module in model.named_modules() if name and isinstance(module, kinds)}


def output_layers(model) -> dict[str, str]:
    """{module name: why no adapter may go there} for the output layer (get_output_embeddings(), whatever it is
    called: lm_head, embed_out, ...) and for a layer that shares its weights (the input embedding of a model with
    tied embeddings). TRL computes the answer's log-probabilities from the output layer's weight directly, so an
    adapter there is never trained (TRL refuses it); one on the tied input embedding would, merged at export,
    change the output layer too, and the export would score otherwise than the adapter did."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None:
        return {}
    found = {}
    for name, module in model.named_modules():
        if module is head:
            found[name] = "the output layer, whose weights TRL reads directly, so an adapter there is never trained"
        elif name and getattr(module, "weight", None) is weight:
            found[name] = ("the input embedding, which shares its weights with the output layer: merged at export, "
                           "an adapter there would change the output layer too")
    return found


def targets_module(name: str, target: str) -> bool:
    """PEFT's rule for a --lora_targets entry: the module's full name, or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def peft_targets(targets: list[str]) -> str | list[str]:
    """target_modules for LoraConfig: PEFT reads its all-linear shorthand only as a string, never in a list."""
    return ALL_LINEAR if [t.lower() for t in targets] == [ALL_LINEAR] else list(targets)


def check_lora_targets(model, targets: list[str]) -> None:
    """Refuse --lora_targets that PEFT would not adapt as asked, naming the layers that can be, before PEFT's bare
    ValueError or TRL's traceback; the matching is PEFT's (`targets_module`, `peft_targets`)."""
    layers = lora_layers(model)
    barred = output_layers(model)
    allowed = sorted({name.rsplit(".", 1)[-1] for name in layers if name not in barred})
    choices = (f"Its layers that LoRA can adapt are: {', '.join(allowed)}; or give {ALL_LINEAR} (every linear layer "
               "but the output layer), or a dotted suffix such as self_attn.q_proj for one of several layers of a "
               "name.")
    if any(t.lower() == ALL_LINEAR for t in targets):
        if len(targets) > 1:
            raise UserError(f"--lora_targets {','.join(targets)}: {ALL_LINEAR} stands alone (PEFT reads it only so); "
                            f"give either {ALL_LINEAR} or the layers by name.")
        if not any(isinstance(m, linear_kinds()) for n, m in layers.items() if n not in barred):
            raise UserError(f"--lora_targets {ALL_LINEAR}: this model has no linear layer but its output layer. "
                            f"{choices}")
        return
    for target in targets:
        hit = next((name for name in barred if targets_module(name, target)), None)
        if hit is not None:
            raise UserError(f"--lora_targets {target} names {hit}, {barred[hit]}. Leave it out. {choices}")
    missing = [t for t in targets if not any(targets_module(name, t) for name in layers)]
    if missing:
        raise UserError(f"--lora_targets {','.join(missing)} match no layer of this model that LoRA can adapt. "
                        f"{choices}")
