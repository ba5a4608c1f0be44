"""TRL's tokens must be the scorer's: the one check, for the SFT and the DPO trainer alike.

The scorer reads P(sarcastic) at the position right after THE prompt, tokenized with
add_special_tokens=False (the chat template holds the special tokens). A trainer that saw other
tokens before the answer (a second BOS, a token merged across the prompt/answer boundary, a
prompt cut short) would train a position evaluation never reads, and the run's validation F1
would measure a model trained on something else. So a mismatch is an error (UserError, exit 2,
raised before the output folder is touched), never a warning: the fix is another model, another
--pair_style or a larger --max_length, and a run that trained anyway would be silently wrong.

    python -c "from sarcasm_dpo.training.trl_tokens import check_trl_tokens; help(check_trl_tokens)"
"""

from __future__ import annotations

from ..errors import UserError
from ..prompts import label_token_ids


def trl_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """The prompts as TRL must get them for its tokens to equal the scorer's.

    TRL tokenizes plain-text prompts with the tokenizer's special tokens on; the rendered chat
    template already holds them, so a tokenizer that adds a BOS would get it twice: it is cut
    from the text. A tokenizer that adds other special tokens has no such form: refused.
    """
    prompts = list(prompts)
    if not prompts:
        return prompts
    plain = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    if tokenizer(prompts)["input_ids"] == plain:
        return prompts
    bos = tokenizer.bos_token
    if bos:
        stripped = [p[len(bos):] if p.startswith(bos) else p for p in prompts]
        if tokenizer(stripped)["input_ids"] == plain:
            return stripped
    raise UserError("This tokenizer adds special tokens that its chat template does not contain, so the trainer "
                    "would read different prompt tokens from the ones evaluation reads. Use another model.")


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
