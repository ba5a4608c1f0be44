"""The one scorer: P(sarcastic) for a batch of texts from a single forward pass per batch.

We read the next-token logits of the two label words at the last prompt position and take a
softmax over just those two: p = exp(l_yes) / (exp(l_yes) + exp(l_no)). No text is generated and
parsed, so there are no unparseable answers, and every stage (SFT validation, DPO early stopping,
mining, compare, predict) gets the same probabilities, from which accuracy at 0.5, ROC-AUC and any
threshold follow.

Speed comes from three choices: prompts are sorted by length so batches carry little padding,
padding goes on the left so the last position is the answer position for every row, and the model
computes the LM head for that one position only (`logits_to_keep=1`), not for the whole sequence.

    python -m sarcasm_dpo.cli predict --model HuggingFaceTB/SmolLM2-135M-Instruct --input texts.txt
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .prompts import build_prompts, label_token_ids


class Scorer:
    def __init__(self, model, tokenizer, batch_size: int = 16, max_text_tokens: int = 256, progress: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_text_tokens = max_text_tokens
        self.progress = progress
        self.no_id, self.yes_id = label_token_ids(tokenizer)  # fails early if a label word is not one token

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        prompts = build_prompts(self.tokenizer, texts, self.max_text_tokens)
        return self.tokenizer(prompts, add_special_tokens=False)["input_ids"]

    def batches(self, encoded: list[list[int]]) -> Iterable[tuple[np.ndarray, dict]]:
        """Length-sorted, left-padded batches as (original indices, model inputs)."""
        import torch

        order = np.argsort([-len(ids) for ids in encoded], kind="stable")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = encoded[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids) :] = 1
            yield idx, {"input_ids": input_ids, "attention_mask": attention}

    def label_logits(self, inputs: dict):
        """(batch, 2) logits of [No, Yes] at the answer position; one forward pass, LM head on one position."""
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        # Left padding shifts the real tokens right; position ids must count from each row's first real token.
        position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        out = self.model(**inputs, position_ids=position_ids, logits_to_keep=1, use_cache=False)
        last = out.logits[:, -1, :]
        return last[:, [self.no_id, self.yes_id]].float()

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """P(sarcastic) for each text, in the input order."""
        import torch

        texts = [str(t) for t in texts]
        probs = np.zeros(len(texts), dtype=np.float64)
        if not texts:
            return probs
        was_training = self.model.training
        self.model.eval()
        encoded = self.encode(texts)
        batches = self.batches(encoded)
        if self.progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=-(-len(texts) // self.batch_size), desc="scoring", unit="batch")
        try:
            with torch.inference_mode():
                for idx, inputs in batches:
                    pair = torch.softmax(self.label_logits(inputs), dim=-1)
                    probs[idx] = pair[:, 1].cpu().numpy()
        finally:
            if was_training:
                self.model.train()
        return probs


def predict_labels(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    return (np.asarray(probs) >= threshold).astype(int)
