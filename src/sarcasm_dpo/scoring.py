"""The one scorer: P(sarcastic) for a batch of texts from a single forward pass per batch.

We read the next-token logits of the two label words at the last prompt position and take a
softmax over just those two: p = exp(l_yes) / (exp(l_yes) + exp(l_no)). No text is generated and
parsed, so there are no unparseable answers, and every stage (SFT validation, DPO early stopping,
mining, compare, predict) gets the same probabilities, from which accuracy at 0.5, ROC-AUC and any
threshold follow. A score that is not finite (NaN weights) is refused here, for every stage at once
(NonFiniteScores), before any caller sees it.

Speed comes from four choices: prompts are sorted by length so batches carry little padding,
padding goes on the left so the last position is the answer position for every row, the model
computes the LM head for that one position only (`logits_to_keep=1`), and the tokens every prompt
starts with (the chat template's system turn and the question, ~40% of a GEN prompt) are run once
per call and their keys/values shared by every batch (`prefix_cache`), so each text costs only its
own tokens. That last one is for CPUs (the default there): on a GPU, at these batch sizes, the step
is bound by launching kernels, not by arithmetic, and the cache's extra work per layer made the
forward passes slower (H100, Qwen2.5-0.5B shape, 256 texts at batch 16, bare forward passes: 0.30 s
over full prompts against 0.37 s with the prefix, and 0.53 against 0.68 s in an earlier check;
bench/README.md, "GPU"), so off a CPU the default is full prompts. On a GPU the host stays out of the way: prompts are tokenized in threads, every batch
is built and copied before the first one runs (`on_device`), and nothing in the batch loop waits for
the device, so the host queues the batches back to back and reads all results in one transfer.

    python -m sarcasm_dpo.cli predict --model HuggingFaceTB/SmolLM2-135M-Instruct --input texts.txt
"""

from __future__ import annotations

import inspect
import itertools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Iterable, Sequence

import numpy as np

from .errors import UserError
from .prompts import build_prompts, label_token_ids

# Architectures on which the shared-prefix path was checked against the plain path in this
# process: (model class, attention implementation, dtype, device type) -> agreed?
_PREFIX_CHECKED: dict[tuple, bool] = {}


def _base_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return getattr(model, "get_base_model", lambda: model)()


def cache_argument(model) -> str:
    """The name the model's forward takes a KV cache under."""
    # transformers 5.x renamed `past_key_values` to `cache` (the old name still works, with a warning).
    return "cache" if "cache" in inspect.signature(_base_model(model).forward).parameters else "past_key_values"


def shared_prefix_length(encoded: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each prompt at least one token of its own.

    Taken from the token ids themselves rather than from the template, so a tokenizer that merges
    the last template token with the text can never make the shared part wrong: it just gets shorter.
    """
    if not encoded:
        return 0
    first = encoded[0]
    length = min(len(ids) for ids in encoded) - 1
    for ids in encoded[1:]:
        n = 0
        while n < length and ids[n] == first[n]:
            n += 1
        length = n
        if length == 0:
            break
    return max(length, 0)


class NonFiniteScores(UserError):
    """The model gave NaN or infinite P(sarcastic) for some texts: its numbers are broken, not the texts.

    Raised by `Scorer.predict_proba`, the one place every stage (training validation, mine, compare,
    predict, the Python API) gets P(sarcastic), before any of the call's scores is returned: a NaN
    compares false with every threshold, so it would be printed as label 0 (and as invalid JSON) or
    counted as "not sarcastic" in every metric. A softmax of finite logits is always finite, so
    non-finite scores mean non-finite logits: weights that are NaN/inf (a damaged file, or the
    training that wrote them diverged) or that overflow the dtype. It names the model the scorer was told
    it scores (`Scorer.name`).
    """

    def __init__(self, bad: int, total: int, model: str | None = None):
        self.bad, self.total, self.model = bad, total, model
        which = f"{model} gave" if model else "The model gave"
        super().__init__(
            f"{which} a non-finite P(sarcastic) (NaN or infinite) for {bad} of the {total} texts scored together, "
            "so none of them was used: its weights (or its adapter's) are damaged, or the training that made them "
            "diverged. A softmax of finite logits is never NaN, so no text causes this. Retrain the model (a lower "
            "--lr, or fp32 where it ran in fp16), or use another copy of its weights.")


class Scorer:
    def __init__(self, model, tokenizer, batch_size: int = 16, max_text_tokens: int = 256, progress: bool | str = False,
                 prefix_cache: bool | None = None, name: str | None = None):
        """`progress`: show a progress bar per `predict_proba` call; a string is the bar's label (e.g.
        "scoring sft"), so that several bars in one run say which model each one scores.
        `name`: the model scored, as errors name it (e.g. "The SFT adapter models/sft (on BASE)"); a scorer
        whose adapters are switched between calls is told each one's, as its progress label is.
        `prefix_cache`: run the shared prefix once per call; None = where the model is on a CPU (module
        docstring: it saves compute, which only a CPU is short of)."""
        if batch_size < 1 or max_text_tokens < 1:
            raise ValueError(f"batch_size and max_text_tokens must be positive, got {batch_size} and {max_text_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_text_tokens = max_text_tokens
        self.progress = progress
        self.prefix_cache = prefix_cache
        self.name = name
        self.no_id, self.yes_id = label_token_ids(tokenizer)  # fails early if a label word is not one token

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's prompt as token ids, in input order.

        Tokenizing is most of what a call costs the host beyond the forward passes (the text to check
        its length, then the prompt: ~0.4 ms a GEN text on a shared 2-core CPU), and the GPU waits for
        it: the batches are sorted by token length, so none can start before every text is tokenized.
        A fast (Rust) tokenizer lets go of the GIL while it works, so on many texts chunks go to
        threads, one per core: the same ids, sooner.
        """
        texts = list(texts)
        workers = _tokenizer_threads(self.tokenizer, len(texts))
        if workers < 2:
            return self._encode_chunk(texts)
        size = -(-len(texts) // workers)
        with ThreadPoolExecutor(workers) as pool:
            parts = pool.map(self._encode_chunk, [texts[i : i + size] for i in range(0, len(texts), size)])
            return [ids for part in parts for ids in part]

    def _encode_chunk(self, texts: Sequence[str]) -> list[list[int]]:
        prompts = build_prompts(self.tokenizer, texts, self.max_text_tokens)
        return self.tokenizer(prompts, add_special_tokens=False)["input_ids"]

    def batches(self, encoded: list[list[int]], skip: int = 0,
                batch_size: int | None = None) -> Iterable[tuple[np.ndarray, dict]]:
        """Length-sorted, left-padded batches as (original indices, model inputs), without the first `skip` tokens."""
        import torch

        size = batch_size or self.batch_size
        order = np.argsort([-len(ids) for ids in encoded], kind="stable")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            rows = [encoded[i][skip:] for i in idx]
            lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
            width = int(lengths.max())
            # Each row's real tokens sit at its right end; a boolean mask fills them row by row in one
            # numpy call instead of one small tensor per row.
            real = np.arange(width) >= (width - lengths)[:, None]
            input_ids = np.full((len(idx), width), pad_id, dtype=np.int64)
            input_ids[real] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
            yield idx, {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(real.astype(np.int64))}

    def on_device(self, batches: Iterable[tuple[np.ndarray, dict]]) -> list[tuple[np.ndarray, dict]]:
        """Every batch's inputs on the model's device, moved in one copy before the first forward pass.

        The batches are built on the host while the GPU runs the shared prefix, then packed into one
        buffer (pinned on CUDA, copied without waiting) whose slices are the batches: the loop over
        batches then does no host work but launching the model, and no copy per batch.
        """
        import torch

        batches = list(batches)
        if not batches:
            return batches
        device = self._device()
        flat = torch.cat([tensor.reshape(-1) for _, inputs in batches for tensor in inputs.values()])
        flat = flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat.to(device)
        placed, at = [], 0
        for idx, inputs in batches:
            views = {}
            for key, tensor in inputs.items():
                views[key] = flat[at : at + tensor.numel()].view(tensor.shape)
                at += tensor.numel()
            placed.append((idx, views))
        return placed

    def _device(self):
        return next(self.model.parameters()).device

    def uses_prefix_cache(self) -> bool:
        """Whether calls try the shared-prefix cache (it may still be refused for an architecture)."""
        return self.prefix_cache if self.prefix_cache is not None else self._device().type == "cpu"

    def forward_kwargs(self, inputs: dict, prefix: "PrefixCache | None" = None) -> dict:
        """The model call for a batch already on the model's device: one forward pass, LM head on one position.

        With `prefix` (from `encode_prefix`), `inputs` holds only what follows the shared prefix, and
        the prefix's keys/values are reused instead of being computed again for every row.
        """
        import torch

        mask = inputs["attention_mask"]
        # Left padding shifts the real tokens right; position ids must count from each row's first real token.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        extra = {"use_cache": False}
        if prefix is not None:
            position_ids = position_ids + prefix.length
            # Rows see [prefix | their own left-padded tokens]; pads in the middle are masked out.
            mask = torch.cat([torch.ones((mask.shape[0], prefix.length), dtype=mask.dtype, device=mask.device), mask], 1)
            extra = {self.cache_argument: prefix.cache_for(mask.shape[0]), "use_cache": True}
        return {"input_ids": inputs["input_ids"], "attention_mask": mask, "position_ids": position_ids,
                "logits_to_keep": 1, **extra}

    def next_token_logits(self, inputs: dict, prefix: "PrefixCache | None" = None):
        """(batch, vocab) logits of the next token at the answer position, on the model's device."""
        device = self._device()
        cuda = device.type == "cuda"  # pinned + non_blocking: the copy queues behind the previous batch instead of waiting
        inputs = {k: v if v.device == device else v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device)
                  for k, v in inputs.items()}  # inputs from `on_device` are there already
        return self.model(**self.forward_kwargs(inputs, prefix)).logits[:, -1, :]

    def label_logits(self, inputs: dict, prefix: "PrefixCache | None" = None):
        """(batch, 2) logits of [No, Yes] at the answer position."""
        import torch

        logits = self.next_token_logits(inputs, prefix)
        # Two column slices, not `logits[:, [no, yes]]`: a Python list as an index is copied to the GPU
        # with a blocking copy, which makes the host wait for the batch's forward pass to finish.
        return torch.stack((logits[:, self.no_id], logits[:, self.yes_id]), dim=-1).float()

    def sarcastic_proba(self, inputs: dict, prefix: "PrefixCache | None" = None):
        """P(sarcastic) per row, as a tensor on the model's device: softmax over the two label logits."""
        import torch

        return torch.softmax(self.label_logits(inputs, prefix), dim=-1)[:, 1]

    @cached_property
    def cache_argument(self) -> str:
        return cache_argument(self.model)

    def encode_prefix(self, prefix_ids: list[int]) -> "PrefixCache":
        """Run the shared prefix once (batch of one) and keep its keys/values."""
        import torch

        ids = torch.tensor([prefix_ids], dtype=torch.long, device=self._device())
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), **{self.cache_argument: None},
                         use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        return PrefixCache(len(prefix_ids), cache, getattr(_base_model(self.model), "config", None))

    def shared_prefix(self, encoded: list[list[int]], length: int) -> "PrefixCache | None":
        """The prefix's cache, or None where this model cannot use one.

        Once per architecture/dtype/device in a process, both paths score two prompts and must give
        the same probabilities: any Hugging Face causal LM may come in, and if its cache does not
        compose this way (or fails) we warn and score without it rather than report other numbers.
        """
        import torch

        base = _base_model(self.model)
        dtype = next(self.model.parameters()).dtype
        attention = getattr(getattr(base, "config", None), "_attn_implementation", None)
        key = (type(base).__name__, attention, str(dtype), self._device().type)
        if _PREFIX_CHECKED.get(key) is False:
            return None
        if key in _PREFIX_CHECKED:
            return self.encode_prefix(encoded[0][:length])
        sample = [encoded[0], min(encoded, key=len)]  # ragged on purpose: padding in the middle must be masked
        prefix = None
        try:
            prefix = self.encode_prefix(encoded[0][:length])
            (_, inputs_full), = list(self.batches(sample, batch_size=len(sample)))
            (_, inputs_tail), = list(self.batches(sample, skip=length, batch_size=len(sample)))
            plain = self.sarcastic_proba(inputs_full)
            if not bool(torch.isfinite(plain).all()):
                # The weights, not the cache, are broken (NonFiniteScores follows when scoring): no verdict on
                # the cache is recorded, and none is warned about.
                return None
            cached = self.sarcastic_proba(inputs_tail, prefix)
            gap = float((plain - cached).abs().max())
            tolerance = 1e-3 if dtype == torch.float32 else 5e-2
            agrees = bool(np.isfinite(gap) and gap <= tolerance)
            why = f"P(sarcastic) differs by {gap:.2g}, tolerance {tolerance:g}"
        except Exception as exc:  # an architecture whose cache does not compose this way
            agrees, why = False, f"{type(exc).__name__}: {exc}"
        if not agrees:
            warnings.warn(f"Scoring {key[0]} without the shared-prefix cache ({why}): same results, more compute.",
                          stacklevel=4)
        _PREFIX_CHECKED[key] = agrees
        return prefix if agrees else None

    def plan(self, texts: Sequence[str]) -> tuple[Iterable[tuple[np.ndarray, dict]], "PrefixCache | None"]:
        """Tokenize, then run the shared prefix once: (batches of what follows it, the prefix's cache or None).

        Call with the model in eval mode under torch.inference_mode(), as `predict_proba` does.
        """
        return self.plan_encoded(self.encode(texts))

    def plan_encoded(self, encoded: list[list[int]]) -> tuple[Iterable[tuple[np.ndarray, dict]], "PrefixCache | None"]:
        """`plan` for prompts tokenized already (by `encode`). The prefix is run with the weights as they are now."""
        prefix, skip = None, 0
        if len(encoded) > 1 and self.uses_prefix_cache():
            skip = shared_prefix_length(encoded)
            prefix = self.shared_prefix(encoded, skip) if skip else None
            skip = skip if prefix is not None else 0
        return self.batches(encoded, skip=skip), prefix

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """P(sarcastic) for each text, in the input order. Every score is checked before any is returned:
        a non-finite one raises NonFiniteScores, so a caller never holds, prints or counts a NaN."""
        import torch

        texts = [str(t) for t in texts]
        probs = np.zeros(len(texts), dtype=np.float64)
        if not texts:
            return probs
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                batches, prefix = self.plan(texts)
                batches = self.on_device(batches)
                if self.progress:
                    from tqdm.auto import tqdm

                    label = self.progress if isinstance(self.progress, str) else "scoring"
                    batches = tqdm(batches, desc=label, unit="batch")
                # Nothing in this loop waits for the GPU (no copy, no transfer back, no Python test of a
                # result), so the host queues batch after batch; the results come back in one transfer.
                pending = [(idx, self.sarcastic_proba(inputs, prefix)) for idx, inputs in batches]
                probs[np.concatenate([idx for idx, _ in pending])] = torch.cat([p for _, p in pending]).cpu().numpy()
        finally:
            if was_training:
                self.model.train()
        bad = int(np.count_nonzero(~np.isfinite(probs)))
        if bad:
            raise NonFiniteScores(bad, len(texts), self.name)
        return probs


class PrefixCache:
    """The shared prefix's keys/values, handed to each batch as a fresh cache of the right batch size.

    A fresh cache per batch because the forward pass appends the batch's own keys/values to it;
    `expand` makes the copies views, so the prefix is stored once.
    """

    def __init__(self, length: int, cache, config=None):
        self.length = length
        self.layers = [tuple(entry[:2]) for entry in _cache_entries(cache)]
        self.config = config  # lets transformers lay out sliding-window layers as the model has them

    def cache_for(self, rows: int):
        from transformers import DynamicCache

        data = [(k.expand(rows, *k.shape[1:]), v.expand(rows, *v.shape[1:])) for k, v in self.layers]
        return DynamicCache(ddp_cache_data=data, config=self.config)


def _tokenizer_threads(tokenizer, texts: int, per_thread: int = 32) -> int:
    """How many threads to tokenize `texts` with: one per usable core, at least `per_thread` texts each.

    One thread where that could be unsafe or useless: a slow (Python) tokenizer holds the GIL, and
    a backend with truncation or padding set would be reset by the first call while others read it.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8, texts // per_thread))


def _cache_entries(cache):
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(cache)  # legacy tuple-of-tuples
