"""The one prompt: every stage (SFT, DPO, mining, evaluation, predict) builds it here.

The question goes in a user turn rendered with the tokenizer's own chat template, with the
generation prompt appended, so the model's very next token is the answer. The answer is a single
label token ("Yes" = sarcastic, "No" = not), which is what lets the scorer classify a text from
one forward pass.

    python -c "from sarcasm_dpo.prompts import QUESTION; print(QUESTION)"
"""

from __future__ import annotations

from .errors import UserError

QUESTION = (
    "Is the following text sarcastic? Answer with a single word: Yes or No.\n\n"
    "Text: {text}"
)
POSITIVE_WORD = "Yes"  # label 1, sarcastic
NEGATIVE_WORD = "No"   # label 0, not sarcastic
LABEL_WORDS = (NEGATIVE_WORD, POSITIVE_WORD)  # index = label


def label_word(label: int) -> str:
    return LABEL_WORDS[int(label)]


def require_chat_template(tokenizer, model_name: str = "this model") -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"The tokenizer of {model_name} has no chat template, so the prompt cannot be built the way the model "
            "was taught to read it. Use an instruction-tuned (chat) model, e.g. Qwen/Qwen2.5-0.5B-Instruct."
        )


def truncate_text(tokenizer, text: str, max_text_tokens: int) -> str:
    """Cut a text to at most `max_text_tokens` tokens; the prompt around it is never cut."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_text_tokens:
        return text
    return tokenizer.decode(ids[:max_text_tokens], skip_special_tokens=True).rstrip() + " ..."


def build_prompt(tokenizer, text: str, max_text_tokens: int = 256) -> str:
    """The rendered prompt string; tokenize it with add_special_tokens=False (the template has them)."""
    messages = [{"role": "user", "content": QUESTION.format(text=truncate_text(tokenizer, str(text), max_text_tokens))}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_prompts(tokenizer, texts, max_text_tokens: int = 256) -> list[str]:
    """`build_prompt` for many texts, the same strings, with one template render and one tokenizer call.

    Rendering the chat template (Jinja) and tokenizing each text on its own cost ~0.1 ms a text:
    nothing next to a CPU forward pass, but on a GPU that is most of what a batch costs.
    """
    texts = [str(t) for t in texts]
    frame = prompt_frame(tokenizer)
    if frame is None:  # a template that alters the text it is given: render each prompt
        return [build_prompt(tokenizer, t, max_text_tokens) for t in texts]
    before, after = frame
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    cut = [t if len(i) <= max_text_tokens else truncate_text(tokenizer, t, max_text_tokens) for t, i in zip(texts, ids)]
    return [before + t + after for t in cut]


_FRAME_MARKER = "\u2063sarcasm-dpo-text\u2063"  # invisible separators: never in a real text by accident
# Leading/trailing space, newlines, braces, quotes and markup: what a template that trims, escapes or
# formats its content would change.
_FRAME_PROBE = "  {x} 'quoted' \"double\" <b>&amp;</b>\n\nsecond line\t "


def prompt_frame(tokenizer) -> tuple[str, str] | None:
    """The rendered prompt around its text, (before, after), if the template inserts text verbatim, else None."""
    rendered = build_prompt(tokenizer, _FRAME_MARKER, max_text_tokens=10**9)
    if rendered.count(_FRAME_MARKER) != 1:
        return None
    before, after = rendered.split(_FRAME_MARKER)
    if build_prompt(tokenizer, _FRAME_PROBE, max_text_tokens=10**9) != before + _FRAME_PROBE + after:
        return None
    return before, after


def label_token_ids(tokenizer) -> tuple[int, int]:
    """(No id, Yes id) as the model sees them right after the generation prompt.

    We tokenize prompt+word and take what the word adds, because many tokenizers spell a word
    differently after a newline or a space than alone; the word must add exactly one token.
    """
    require_chat_template(tokenizer)
    prompt = build_prompt(tokenizer, "probe")
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = []
    for word in LABEL_WORDS:
        full = tokenizer(prompt + word, add_special_tokens=False)["input_ids"]
        added = full[len(base):]
        if full[: len(base)] != base or len(added) != 1:
            pieces = tokenizer.convert_ids_to_tokens(added) if added else []
            raise UserError(
                f"The label word {word!r} is not a single token for this tokenizer (it becomes {pieces}). "
                "Scoring reads the next-token probability of each label word, so each must be one token; "
                "use a tokenizer where 'Yes' and 'No' are single tokens (Qwen, Llama, SmolLM and most chat models are)."
            )
        ids.append(added[0])
    if ids[0] == ids[1]:
        raise UserError("'Yes' and 'No' map to the same token for this tokenizer; they cannot be told apart.")
    return ids[0], ids[1]


def strip_special_prefix(tokenizer, prompts: list[str]) -> list[str] | None:
    """The prompts as TRL must get them for its tokens to equal the scorer's; None if no such form exists.

    TRL tokenizes plain-text prompts with the tokenizer's special tokens on; the rendered chat
    template already holds them, so a tokenizer that adds a BOS would get it twice: it is cut
    from the text. None: the tokenizer adds special tokens other than a leading BOS (the stage
    decides whether that is an error).
    """
    plain = tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    if tokenizer(prompts[0])["input_ids"] == plain:
        return list(prompts)
    bos = tokenizer.bos_token
    if bos and prompts[0].startswith(bos) and tokenizer(prompts[0][len(bos):])["input_ids"] == plain:
        return [p[len(bos):] if p.startswith(bos) else p for p in prompts]
    return None
