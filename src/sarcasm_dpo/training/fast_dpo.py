"""Faster DPO steps with the same results: the reference's log-probabilities computed once, before
training, and one pass over each prompt for label pairs.

    python -c "from sarcasm_dpo.training.fast_dpo import dpo_trainer_class; print(dpo_trainer_class(precompute_ref=True))"

The reference is frozen (the SFT adapter, kept as TRL's second PEFT adapter "ref" on the same
weights), so its log-probabilities of every pair never change. TRL's own switch,
`precompute_ref_log_probs`, runs the reference once over the training set and hands the values to
the loss with each batch (the collator carries the `ref_chosen_logps` / `ref_rejected_logps`
columns, `_compute_loss` reads them instead of running the reference), so each training step
saves two of its four forward passes. The loss, metrics and logging stay TRL's.

What we change is where the values are kept. TRL writes them to an Arrow file named after the
dataset's cache files; our datasets live in memory, which makes that name random per process, so
under `accelerate launch` / `torchrun` every process but the main one would look for a file that
does not exist. `InMemoryReference` computes them the same way (TRL's `compute_ref_log_probs` on
each batch, every process on its share, gathered in order) and adds them as in-memory columns on
every process. Resume: they are computed in the trainer's constructor from the "ref" adapter,
which a checkpoint never changes, so a resumed run gets the same values. The "ref" adapter stays
on the model: the KL diagnostics still read it.

One pass per label pair (`OnePassPairs`). TRL's collator lays a batch of B pairs out as 2B full
sequences, [prompt, chosen answer, EOS] then [prompt, rejected answer, EOS] (TRL appends EOS to
every answer that lacks it), and its loss sums the log-probs of the answer tokens: for label pairs
log p(label | prompt) + log p(EOS | prompt, label). The two rows of a pair share the whole prompt,
so we run each prompt but its last token once (B rows, backbone only, with gradients), then the 2B
short rows [last prompt token, answer tokens but the last] on top of those keys/values, scored
against the answer tokens by TRL's own fused LM head. That gives the same per-token log-probs,
entropies, mean logits and top-1 hits at the same positions, EOS included, and TRL's
`_compute_loss` turns them into its loss, rewards and metrics as always: only the model call
changes, through a stand-in model handed to TRL. The loss covers exactly the tokens the full-sequence
path covers (the label and the EOS after it); nothing is dropped or added.

Packed (`PackedPairs`, `--pack_pairs`, with OnePassPairs): those calls (shared prefix, prompts,
answer rows) become one, the micro-batch laid out as one unpadded row under a block attention
mask (packed_pairs.py); the same outputs, fewer and larger matrix products.
"""

from __future__ import annotations

from ..training.shared_prefix import FastForward, SharedPrefixTraining, trainer_class

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


class InMemoryReference:
    """DPOTrainer mixin: TRL's precomputed reference log-probs, kept as in-memory columns on every process.

    Needs `precompute_ref_log_probs=True` in the DPOConfig (that is what makes TRL read them).
    """

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        import torch
        from torch.utils.data import DataLoader

        if self.is_deepspeed_enabled:  # TRL wraps ZeRO-sharded weights in an inference engine first
            return super()._precompute_ref_logps(dataset, name, batch_size)
        dataset = dataset.remove_columns([c for c in REF_COLUMNS if c in dataset.column_names])
        loader = self.accelerator.prepare(DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator,
                                                     shuffle=False, num_workers=0))
        chosen, rejected = [], []
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in loader:
                ref_chosen, ref_rejected = self.compute_ref_log_probs(self.model, batch)
                ref_chosen, ref_rejected = self.accelerator.gather_for_metrics((ref_chosen, ref_rejected))
                chosen.append(ref_chosen.float().cpu())
                rejected.append(ref_rejected.float().cpu())
        finally:
            self.model.train(was_training)
        chosen, rejected = torch.cat(chosen).tolist(), torch.cat(rejected).tolist()
        if len(chosen) != len(dataset):
            raise RuntimeError(f"Reference log-probs for {len(chosen)} of {len(dataset)} {name} pairs.")
        return dataset.add_column(REF_COLUMNS[0], chosen).add_column(REF_COLUMNS[1], rejected)


class OnePassPairs(FastForward):
    """DPOTrainer mixin: each pair's prompt runs once; its two answers run on top of its keys/values.

    Exact for any pairs (the answers attend to the same prompt keys/values the full rows would
    compute); build_trainer turns it on for label pairs, where it saves the most.
    """

    def _fast_forward_options(self) -> dict:
        return {**super()._fast_forward_options(), "prompt_once": True}


class PackedPairs(FastForward):
    """DPOTrainer mixin, with OnePassPairs: the micro-batch's prompts and answers in one packed call
    (packed_pairs.py), where this model's attention takes a block mask; else OnePassPairs' three calls."""

    def _fast_forward_options(self) -> dict:
        return {**super()._fast_forward_options(), "packed": True}


def is_label_pairs(pairs) -> bool:
    """True when every answer is a label word alone ("Yes" / "No"): the pairs `--pair_style label` builds."""
    from ..prompts import LABEL_WORDS

    return bool(set(pairs["chosen"]) | set(pairs["rejected"]) <= set(LABEL_WORDS))


def describe_step(one_pass: bool, precompute_ref: bool, shared_prefix: bool = False, packed: bool = False) -> str:
    """The line that says which DPO path runs."""
    policy = ("one pass over each prompt for both label answers" if one_pass
              else "TRL's two full sequences per pair (chosen, rejected)")
    if packed:
        policy += ", the micro-batch packed into one call"
    reference = ("computed once before training" if precompute_ref
                 else "two more full sequences per pair at every step")
    prefix = "; the prompts' shared prefix runs once per micro-batch" if shared_prefix else ""
    return f"DPO step: policy log-probs from {policy}; reference log-probs {reference}{prefix}."


def dpo_trainer_class(base: type | None = None, *, precompute_ref: bool = True, one_pass: bool = False,
                      shared_prefix: bool = False, pack_pairs: bool = False) -> type:
    """`base` (TRL's DPOTrainer by default) with the fast paths asked for; the same class for the same request.

    The mixins use cooperative super(), so another mixin (or recipe.seeded_length_grouping) can be
    layered on the result.
    """
    if base is None:
        from trl import DPOTrainer

        base = DPOTrainer
    chosen = ((PackedPairs, one_pass and pack_pairs), (OnePassPairs, one_pass), (SharedPrefixTraining, shared_prefix),
              (InMemoryReference, precompute_ref))
    return trainer_class(base, *(m for m, on in chosen if on))
