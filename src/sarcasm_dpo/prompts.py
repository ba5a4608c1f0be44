"""The one prompt: every stage (SFT, DPO, mining, evaluation, predict) builds it here (`build_prompts`).

The question goes in a user turn rendered with the tokenizer's own chat template, with the
generation prompt appended, so the model's very next token is the answer. The answer is a single
label token ("Yes" = sarcastic, "No" = not), which is what lets the scorer classify a text from
one forward pass.

    python -c "from sarcasm_dpo.prompts import QUESTION; print(QUESTION)"
"""

from __future__ import annotations

import datetime
import functools
import json
import re

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


# A zero-width space inside a special token's spelling: the tokenizer then reads the characters, not the token.
_BREAK = "\u200b"


@functools.lru_cache(maxsize=16)
def _special_pattern(spellings: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(map(re.escape, spellings))) if spellings else None


def plain_text(tokenizer, text: str) -> str:
    """`text` with every spelling of one of the tokenizer's special tokens broken by a zero-width space.

    A tokenizer reads "<|im_start|>" inside a text as the control token itself, so a text could close the
    user turn and forge an assistant answer in the prompt; and cutting a long text (`truncate_text`, which
    decodes without special tokens) would drop the markers, so one text would be read two ways by length.
    Broken this way the characters stay visible to the model as characters, in every stage alike."""
    spellings = tuple(sorted({str(t) for t in getattr(tokenizer, "all_special_tokens", []) or []}
                             | {t.content for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
                                if getattr(t, "special", False)}, key=len, reverse=True))
    pattern = _special_pattern(tuple(t for t in spellings if t))
    if pattern is None or not pattern.search(text):
        return text
    return pattern.sub(lambda m: m.group(0)[0] + _BREAK + m.group(0)[1:], text)


def truncate_text(tokenizer, text: str, max_text_tokens: int) -> str:
    """Cut a text to at most `max_text_tokens` tokens; the prompt around it is never cut."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_text_tokens:
        return text
    return tokenizer.decode(ids[:max_text_tokens], skip_special_tokens=True).rstrip() + " ..."


def build_prompt(tokenizer, text: str, max_text_tokens: int = 256) -> str:
    """The rendered prompt string for one text; tokenize it with add_special_tokens=False (the template has them).

    This is the definition `build_prompts` reproduces in bulk (and checks it does, see `prompt_frame`);
    stages build their prompts with `build_prompts`, which also fits them to a training length.
    """
    text = truncate_text(tokenizer, plain_text(tokenizer, str(text)), max_text_tokens)
    messages = [{"role": "user", "content": QUESTION.format(text=text)}]
    return tokenizer.apply_chat_template(messages, chat_template=dated_template(tokenizer), tokenize=False,
                                         add_generation_prompt=True)


# The date every prompt states, whatever the day it is built: Llama 3.1's own fallback ("26 Jul 2024").
# Templates that read the clock (Llama 3.2+ put "Today Date: <today>" in the system turn; Granite and Mistral
# Small call strftime_now too) would otherwise give a text another prompt, so other scores, on every day: a
# model trained on Monday and thresholded, compared, exported and used on later days would never be read
# with the prompt it learned on. transformers 5 offers no clock argument (strftime_now is a Jinja global over
# datetime.now(), and a callable passed to apply_chat_template reaches the template as a placeholder string),
# so the template itself is pinned: `dated_template`.
PROMPT_DATE = datetime.date(2024, 7, 26)
_DATED_MARK = "{#- sarcasm-dpo: the date pinned (prompts.PROMPT_DATE) -#}"
_STRFTIME_CALL = re.compile(r"""strftime_now\(\s*(["'])(.*?)\1\s*\)""")


def dated_template(tokenizer) -> str | None:
    """The tokenizer's chat template with its date pinned to PROMPT_DATE; the template unchanged when it reads
    no date (Qwen's, for one), and None where the tokenizer has no single template string to pin.

    A prefix defines `strftime_now` (as a macro giving PROMPT_DATE in each format the template asks for) and
    `date_string` (which Llama's templates use where set), both shadowing transformers' own for the whole
    template; it renders no text. A template pinned already (an export's, see `stages/export.py`) is returned as
    it is, so that rendering it with plain `tokenizer.apply_chat_template` gives the scorer's prompt."""
    try:
        source = tokenizer.get_chat_template()
    except (AttributeError, ValueError, TypeError):
        return None
    if not isinstance(source, str):
        return None
    return _dated(source)


@functools.lru_cache(maxsize=16)
def _dated(source: str) -> str:
    if source.startswith(_DATED_MARK) or ("strftime_now" not in source and "date_string" not in source):
        return source
    formats = {fmt: PROMPT_DATE.strftime(fmt) for _, fmt in _STRFTIME_CALL.findall(source)}
    default = PROMPT_DATE.strftime("%d %b %Y")  # a format the template computes: Llama's
    return (_DATED_MARK
            + "{% macro strftime_now(format) %}{{ " + json.dumps(formats) + ".get(format, "
            + json.dumps(default) + ") }}{% endmacro %}"
            + "{% set date_string = " + json.dumps(default) + " %}"
            + "{{ '' }}"  # an expression, not a tag, last: trim_blocks leaves the template's own first newline
            + source)


def build_prompts(tokenizer, texts, max_text_tokens: int = 256, room=None) -> list[str]:
    """THE prompts of every stage (SFT, DPO pairs, mining, the scorer): `build_prompt` for many texts.

    One template render and one tokenizer call for all texts: rendering the chat template (Jinja) and
    tokenizing each text on its own cost ~0.1 ms a text, nothing next to a CPU forward pass, but on a
    GPU that is most of what a batch costs.

    `room` (training only: an int, or one per text) is how many tokens a prompt may take once its
    answer's are set aside (--max_length minus the answer with EOS). The rule, the same in SFT and
    DPO: a prompt over it has its TEXT cut further until it fits, never the question, the template or
    the answer; a trainer would otherwise cut the sequence from the end, i.e. the answer it trains on.
    Texts that fit (all of them, at the defaults) get exactly the scorer's prompt. When even the text cut
    to its first token (and the " ..." that marks a cut) leaves no room, it is a UserError naming how far
    to raise --max_length for every text to fit.
    """
    texts = [plain_text(tokenizer, str(t)) for t in texts]
    frame = prompt_frame(tokenizer)
    if frame is None:  # a template that alters the text it is given: render each prompt
        prompts = [build_prompt(tokenizer, t, max_text_tokens) for t in texts]
    else:
        before, after = frame
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        cut = [t if len(i) <= max_text_tokens else truncate_text(tokenizer, t, max_text_tokens)
               for t, i in zip(texts, ids)]
        prompts = [before + t + after for t in cut]
    if room is None or not prompts:
        return prompts
    rooms = [room] * len(prompts) if isinstance(room, int) else list(room)
    lengths = [len(i) for i in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    out, short = [], []  # short: (tokens the shortest prompt needs, room) of each text that cannot fit
    for p, n, r, t in zip(prompts, lengths, rooms, texts):
        fitted = p if n <= r else _fit_prompt(tokenizer, t, max_text_tokens, r)
        if isinstance(fitted, int):
            short.append((fitted, r))
        out.append(fitted)
    if short:
        # The text that falls shortest names the raise, so that after it every text fits (raising --max_length
        # by d gives every prompt d more tokens of room).
        need, left = max(short, key=lambda item: item[0] - item[1])
        left_text = (f"{left} are left for the prompt once the answer's are taken" if left >= 0 else
                     f"the answer alone is {-left} over --max_length")
        raise UserError(f"--max_length leaves no room for the text: the shortest prompt, with the text cut to its "
                        f"first token, needs {need} tokens, and {left_text}. Raise --max_length (default 512) by "
                        f"at least {need - left}.")
    return out


def _fit_prompt(tokenizer, text: str, max_text_tokens: int, room: int) -> str | int:
    """The prompt for `text` with the text cut to the most tokens that keep prompt tokens <= `room` (see
    `build_prompts`), or, when even its first token does not fit, the tokens that shortest prompt needs.

    The text is cut by a bisection over how many of its tokens it keeps: cutting adds a " ..." and the
    prompt is tokenized again, so the prompt's length is not the budget plus a constant, and guessing the
    budget from the excess can stop short of a fit that exists. Called for prompts over `room` only: the
    text at min(max_text_tokens, its own length) tokens is known not to fit."""
    def length(budget: int) -> int:
        return len(tokenizer(build_prompt(tokenizer, text, budget), add_special_tokens=False)["input_ids"])

    shortest = length(1)
    if shortest > room:
        return shortest
    fits, over = 1, min(max_text_tokens, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    while over - fits > 1:  # length(fits) <= room < length(over)
        middle = (fits + over) // 2
        if length(middle) <= room:
            fits = middle
        else:
            over = middle
    return build_prompt(tokenizer, text, fits)


def answer_length(tokenizer, answer: str) -> int:
    """Tokens a trainer appends for `answer`: the answer and EOS (TRL's SFT and DPO trainers both add it)."""
    return len(tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"])


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
    differently after a newline or a space than alone. The word must add exactly one token, leave the
    prompt's own tokens as they are, and be that word: not the unknown token, not another word.
    """
    require_chat_template(tokenizer)
    prompt = build_prompt(tokenizer, "probe")
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = []
    for word in LABEL_WORDS:
        full = tokenizer(prompt + word, add_special_tokens=False)["input_ids"]
        kept = next((i for i, (a, b) in enumerate(zip(base, full)) if a != b), min(len(base), len(full)))
        if kept < len(base):
            raise UserError(_merged_boundary(tokenizer, prompt, word, base[kept:], full[kept:]))
        added = full[len(base):]
        if len(added) != 1:
            raise UserError(
                f"The label word {word!r} is not a single token for this tokenizer (it becomes "
                f"{_pieces(tokenizer, added)}). Scoring reads the next-token probability of each label word, so each "
                "must be one token; use a tokenizer where 'Yes' and 'No' are single tokens (Qwen, Llama, SmolLM and "
                "most chat models are).")
        ids.append(_check_label_token(tokenizer, word, added[0]))
    if ids[0] == ids[1]:
        raise UserError("'Yes' and 'No' map to the same token for this tokenizer; they cannot be told apart.")
    return ids[0], ids[1]


def _pieces(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(ids)) if ids else []


def _merged_boundary(tokenizer, prompt: str, word: str, before, after) -> str:
    """The refusal for a label word that rewrites the prompt's last token(s) once appended."""
    end = prompt[-12:]
    why = (f"The chat template's generation prompt ends in whitespace ({end!r}), and this tokenizer joins that "
           f"whitespace to the next word" if end[-1:].isspace() else
           f"This tokenizer joins the end of the chat template's generation prompt ({end!r}) to the next word")
    return (f"{why}: appending the label word {word!r} rewrites the prompt's last token(s) "
            f"{_pieces(tokenizer, before)} into {_pieces(tokenizer, after)}, so no token of the answer starts right "
            "after the prompt, where scoring reads the probability of each label word. Use a model whose chat "
            "template ends its generation prompt with a special token or a newline, not a space (Qwen, Llama, "
            "SmolLM and most chat models do).")


def _check_label_token(tokenizer, word: str, token_id: int) -> int:
    """`token_id`, if it is the label word itself: a vocabulary without the word maps it to the unknown token
    (and every stage would then read P(<unk>) as the word's probability), a normalizing one to another word."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and token_id == unk:
        raise UserError(
            f"The label word {word!r} is not in this tokenizer's vocabulary: it is read as the unknown token "
            f"{tokenizer.unk_token!r} (id {token_id}), so scoring would take the probability of "
            f"{tokenizer.unk_token!r} for that of {word!r}. Use a model whose vocabulary holds 'Yes' and 'No' as tokens (Qwen, Llama, SmolLM "
            "and most chat models do).")
    shown = tokenizer.decode([token_id])
    if shown.strip() != word:
        raise UserError(
            f"The label word {word!r} becomes token {token_id}, which reads back as {shown!r}: this tokenizer changes "
            f"the word (case or spelling), so scoring would read the probability of {shown.strip()!r} as that of "
            f"{word!r}. Use a model whose vocabulary holds 'Yes' and 'No' as they are (Qwen, Llama, SmolLM and most "
            "chat models do).")
    return token_id
