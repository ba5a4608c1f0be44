"""TRL's tokens must be the scorer's: the one check, for the SFT and the DPO trainer alike.

The scorer reads P(sarcastic) at the position right after THE prompt, tokenized with
add_special_tokens=False (the chat template holds the special tokens). A trainer that saw other
tokens before the answer (a second BOS, a token merged across the prompt/answer boundary, a
prompt cut short) would train a position evaluation never reads, and the run's validation F1
would measure a model trained on something else. So a mismatch is an error (UserError, exit 2,
raised before the output folder is touched), never a warning: the fix is another model, another
--pair_style or a larger --max_length, and a run that trained anyway would be silently wrong.

A stage hands its trainer `trl_tokenizer(tokenizer)` as processing_class and `trl_prompts(that, prompts)`
as the prompts, then checks what TRL made of them with `check_trl_tokens(dataset, prompts, that, ...)`.

    python -c "from sarcasm_dpo.training.trl_tokens import check_trl_tokens; help(check_trl_tokens)"
"""

from __future__ import annotations

import functools

from ..errors import UserError
from ..prompts import label_token_ids


def trl_tokenizer(tokenizer):
    """The tokenizer to hand a TRL trainer (processing_class): one that tokenizes a prompt as the scorer does.

    TRL tokenizes a plain-text prompt with `tokenizer(prompt)`, i.e. with the tokenizer's special tokens on,
    while the scorer tokenizes THE prompt with add_special_tokens=False, the rendered chat template holding
    them. The two agree for a tokenizer that adds none (Qwen's): it is returned as it is. Any other (one that
    adds a BOS, as Llama's and Mistral's do, or an EOS) gets a view whose calls add no special tokens unless
    asked: the same object in every other respect (its state is shared, it saves the same files), so TRL reads
    exactly the scorer's tokens, the BOS of a template that starts with one included, and no second one.
    (Cutting the BOS from the text instead is not enough: a SentencePiece tokenizer spells the first piece
    of a text otherwise than the same piece after a special token, "▁[" for "[".)
    """
    if getattr(tokenizer, _PLAIN, False) or not _adds_special_tokens(tokenizer):
        return tokenizer
    view = object.__new__(_plain_class(type(tokenizer)))
    view.__dict__ = tokenizer.__dict__
    return view


_PLAIN = "_sarcasm_dpo_adds_no_special_tokens"


def _adds_special_tokens(tokenizer) -> bool:
    probe = ["<probe> Is this sarcastic?", "x"]
    return tokenizer(probe)["input_ids"] != tokenizer(probe, add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=None)
def _plain_class(cls):
    """`cls` with add_special_tokens=False the default of a call; named as `cls`, so that it saves as `cls` does."""

    def __call__(self, *args, **kwargs):
        kwargs.setdefault("add_special_tokens", False)
        return cls.__call__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, _PLAIN: True, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def trl_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """The prompts as TRL must get them, given the tokenizer TRL gets, for its tokens to equal the scorer's.

    With `trl_tokenizer`'s tokenizer (or any that adds no special tokens) they are the prompts themselves.
    A tokenizer that adds a BOS that the rendered template starts with would read it twice: it is cut from
    the text where the rest then tokenizes as it does after the BOS (byte-level BPE, Llama 3's); where not
    (a SentencePiece tokenizer), or for a tokenizer that adds other special tokens, it is refused, naming
    the first tokens of both.
    """
    prompts = list(prompts)
    if not prompts:
        return prompts
    plain = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    given = tokenizer(prompts)["input_ids"]
    if given == plain:
        return prompts
    bos = tokenizer.bos_token
    if bos and all(p.startswith(bos) for p in prompts):
        stripped = [p[len(bos):] for p in prompts]
        cut = tokenizer(stripped)["input_ids"]
        if cut == plain:
            return stripped
        given = cut
    i = next(i for i, (a, b) in enumerate(zip(given, plain)) if a != b)
    raise UserError(_irreconcilable(tokenizer, given[i], plain[i]))


def _irreconcilable(tokenizer, given: list[int], plain: list[int]) -> str:
    first = next((k for k, (a, b) in enumerate(zip(given, plain)) if a != b), min(len(given), len(plain)))
    start = max(0, first - 2)

    def shown(ids):
        part = ids[start:first + 3]
        return f"{part} ({' '.join(map(str, tokenizer.convert_ids_to_tokens(part)))})"

    where = "start with ids" if start == 0 else f"have, from token {start} on, ids"
    return (f"This tokenizer adds special tokens of its own when TRL tokenizes a prompt, and no form of the prompt "
            f"text gives TRL the scorer's tokens: the scorer's prompt tokens {where} {shown(plain)}, TRL's would be "
            f"{shown(given)}. Training on those would teach a position evaluation never reads. Use a model whose "
            "tokenizer adds no special tokens of its own, or only a BOS that its chat template starts with and that "
            "leaves the next token as it is (Qwen, Llama 3, Gemma and SmolLM tokenizers work).")


def trl_examples(dataset) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt tokens, [answer tokens, ...]) of each example a TRL trainer tokenized.

    DPOTrainer keeps prompt_ids, chosen_ids and rejected_ids apart; SFTTrainer keeps one sequence
    whose answer is what the loss covers (the first label that is not -100 starts it).
    """
    if "prompt_ids" in dataset.column_names:
        return [(row["prompt_ids"], [row["chosen_ids"], row["rejected_ids"]]) for row in dataset]
    examples = []
    for row in dataset:
        start = next((i for i, label in enumerate(row["labels"]) if label != -100), len(row["labels"]))
        examples.append((row["input_ids"][:start], [row["input_ids"][start:]]))
    return examples


def check_trl_tokens(dataset, prompts: list[str], tokenizer, max_length: int, *, what: str = "Example",
                     fix: str = "use another model") -> None:
    """Every example TRL tokenized starts with exactly the scorer's prompt tokens, then a label token,
    and fits --max_length whole; raises UserError naming the first that does not.

    `prompts` are the strings the trainer got (`trl_prompts`), in order; `what` names an example in
    the message ("Pair" for DPO) and `fix` is the stage's advice for a tokenizer that merges tokens.
    """
    if len(dataset) != len(prompts):
        raise UserError(f"TRL dropped {len(prompts) - len(dataset)} {what.lower()}(s) whose prompt alone fills "
                        f"--max_length {max_length}; raise --max_length or lower --max_text_tokens.")
    label_ids = set(label_token_ids(tokenizer))
    expected = tokenizer(list(prompts))["input_ids"]  # as TRL reads them; equal to the scorer's (trl_prompts)
    for i, ((prompt_ids, answers), want) in enumerate(zip(trl_examples(dataset), expected)):
        if prompt_ids != want:
            raise UserError(f"{what} {i}: TRL's prompt tokens differ from the scorer's (the tokenizer merges tokens "
                            f"across the prompt/answer boundary); {fix}.")
        if any(not answer or answer[0] not in label_ids for answer in answers):
            raise UserError(f"{what} {i}: the answer does not start with a label token for this tokenizer.")
        longest = len(want) + max(len(answer) for answer in answers)
        if longest > max_length:
            raise UserError(f"{what} {i} needs {longest} tokens but --max_length is {max_length}: its answer would be "
                            "cut. Raise --max_length or lower --max_text_tokens.")
