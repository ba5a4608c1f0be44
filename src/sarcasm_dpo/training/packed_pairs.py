"""One model call per DPO micro-batch of pairs that share their prompts: every prompt, and both
answers of each pair, packed into one row with a block attention mask.

    python -c "from sarcasm_dpo.training.packed_pairs import pack; print(pack([[1,2,3,4]], [([3, 9], [4, 8])], 2))"

`shared_prefix.prompt_once_forward` already runs each pair's prompt once, but in three model calls
(the shared prefix, the prompts, then the 2B short answer rows on their keys/values). On a CPU a
call through PEFT and 30 layers costs about as much as its arithmetic at these sizes, and every
row is padded to the longest prompt. Here the micro-batch becomes one row (more when it would
exceed `MAX_ROW_TOKENS`), with no padding:

    [shared prefix | pair 1: prompt but its last token | last token, chosen answer but its last
     token | last token again, rejected answer but its last token | pair 2: ... ]

Positions restart for each pair after the prefix (each token keeps the position it has in its own
full row), and the attention mask lets a token see the prefix, its own pair's prompt and the
earlier tokens of its own answer, never another pair nor the other answer: so every token attends
to exactly what it attends to in TRL's full rows, and gets the same hidden state. The last prompt
token appears once per answer (one extra token per pair) because TRL's fused LM head scores one
label per position, and it predicts the first token of each answer. The answers' tokens are scored
by that fused head (`shift_labels`), so the per-token log-probs, entropies, mean logits and top-1
hits are TRL's, put back in TRL's layout; the loss covers the answer tokens and the EOS after them,
as the full rows' does.

Custom 4D masks are honoured by the eager and SDPA attention of transformers' decoder models; other
attention implementations (flash attention, flex) fall back to the three-call path. Whether this
model gives the same log-probs both ways is checked once per architecture, attention, dtype and
device in a process (no gradients, eval mode); where it does not, training says so once and uses
the three-call path.
"""

from __future__ import annotations

from typing import Any, NamedTuple

MAX_ROW_TOKENS = 2048  # a packed row's attention is dense (length^2): longer micro-batches take several rows
_MASKS = {"sdpa": "bool", "eager": "float"}  # attention implementations that read a custom 4D mask, and its kind
_CHECKED: dict[tuple, bool] = {}


class Packed(NamedTuple):
    ids: list[list[int]]  # packed rows (unpadded)
    positions: list[list[int]]  # each token's position in its own full row
    groups: list[list[tuple[int, int]]]  # (pair, branch) per token: pair -1 = the shared prefix; branch 0 = prompt
    targets: list[list[int]]  # the answer token a position predicts, -100 where none
    slots: list[list[tuple[int, int]]]  # per full row (chosen rows, then rejected): the (row, column) scoring each answer token


def pack(heads: list[list[int]], answers: list[tuple[list[int], list[int]]], prefix: int,
         max_tokens: int = MAX_ROW_TOKENS) -> Packed:
    """Lay out B pairs: `heads[b]` is pair b's prompt, `answers[b]` its (chosen, rejected) answer tokens;
    the first `prefix` prompt tokens are shared by every pair and appear once per packed row."""
    pairs = len(heads)
    rows: list[dict] = []
    slots: list[list[tuple[int, int]]] = [[] for _ in range(2 * pairs)]

    def new_row() -> dict:
        shared = heads[0][:prefix]
        return {"ids": list(shared), "positions": list(range(prefix)), "groups": [(-1, 0)] * prefix,
                "targets": [-100] * prefix}

    row = new_row()
    for b, (prompt, (chosen, rejected)) in enumerate(zip(heads, answers)):
        own = prompt[prefix:-1]
        size = len(own) + len(chosen) + len(rejected)
        if len(row["ids"]) > prefix and len(row["ids"]) + size > max_tokens:
            rows.append(row)
            row = new_row()
        r = len(rows)
        start = len(prompt) - 1
        row["ids"] += own
        row["positions"] += range(prefix, start)
        row["groups"] += [(b, 0)] * len(own)
        row["targets"] += [-100] * len(own)
        for branch, answer, full_row in ((1, chosen, b), (2, rejected, pairs + b)):
            # [last prompt token, answer tokens but the last] predicts [answer tokens]
            tokens = [prompt[-1], *answer[:-1]]
            slots[full_row] = [(r, len(row["ids"]) + i) for i in range(len(answer))]
            row["ids"] += tokens
            row["positions"] += range(start, start + len(tokens))
            row["groups"] += [(b, branch)] * len(tokens)
            row["targets"] += answer
    rows.append(row)
    return Packed([r["ids"] for r in rows], [r["positions"] for r in rows], [r["groups"] for r in rows],
                  [r["targets"] for r in rows], slots)


def attention_mask_4d(groups: list[list[tuple[int, int]]], width: int, kind: str, dtype, device):
    """(rows, 1, width, width): token i sees token j <= i of the prefix, of its pair's prompt, or of its own answer.
    Padding (after each row's tokens) sees only itself, so no row of the softmax is empty."""
    import torch

    pad = (-2, -1)
    pair = torch.tensor([[g[0] for g in row] + [pad[0]] * (width - len(row)) for row in groups], device=device)
    branch = torch.tensor([[g[1] for g in row] + [pad[1]] * (width - len(row)) for row in groups], device=device)
    index = torch.arange(width, device=device)
    causal = index[None, :] <= index[:, None]
    same_pair = pair[:, None, :] == pair[:, :, None]
    shared = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    allowed = causal[None] & ((pair[:, None, :] == -1) & (pair[:, :, None] != -2) | same_pair & shared)
    allowed |= torch.eye(width, dtype=torch.bool, device=device)[None]
    allowed = allowed[:, None]
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class PairLayout(NamedTuple):
    pairs: int
    prompt_len: Any  # tensor, per row: the prompt's length = the first answer position
    answer_len: Any  # tensor, per row: how many answer tokens (EOS included)
    answer: Any  # (rows, width) bool tensor: the answer positions


def pair_layout(input_ids, labels) -> PairLayout | None:
    """TRL's DPO batch as [chosen rows; rejected rows] of right-padded full rows, each pair's two rows on the
    same prompt and each answer right after it, or None when the batch is not laid out that way."""
    import torch

    rows, width = input_ids.shape
    pairs = rows // 2
    answer = labels != -100
    prompt_len = answer.int().argmax(-1)  # the first answer position = the prompt's length
    answer_len = answer.sum(-1)
    steps = torch.arange(width, device=input_ids.device)
    in_prompt = steps[None] < prompt_len[:pairs, None]
    contiguous = (steps[None] >= prompt_len[:, None]) & (steps[None] < (prompt_len + answer_len)[:, None])
    if not (pairs and rows == 2 * pairs and bool(answer.any(-1).all()) and int(prompt_len.min()) >= 2
            and bool((prompt_len[:pairs] == prompt_len[pairs:]).all())
            and bool(((input_ids[:pairs] == input_ids[pairs:]) | ~in_prompt).all())
            and bool((answer == contiguous).all())):
        return None
    return PairLayout(pairs, prompt_len, answer_len, answer)


def mask_kind(model) -> str | None:
    from ..scoring import _base_model

    implementation = getattr(getattr(_base_model(model), "config", None), "_attn_implementation", None)
    return _MASKS.get(implementation)


def packed_pairs_forward(model, input_ids, attention_mask, labels, prefix_of_length=None):
    """TRL's fused-head output for a [chosen rows; rejected rows] batch from one packed call, or None when the
    batch is not two rows per pair on one prompt or this model's attention takes no custom 4D mask.

    `prefix_of_length`: prompts (token lists) -> how many leading tokens they share (0: none shared).
    """
    import torch

    kind = mask_kind(model)
    layout = pair_layout(input_ids, labels) if kind is not None else None
    if layout is None:
        return None
    pairs, prompt_len, answer_len, answer = layout
    ids = input_ids.tolist()
    lengths, spans = prompt_len.tolist(), answer_len.tolist()
    heads = [ids[b][: lengths[b]] for b in range(pairs)]
    answers = [(ids[b][lengths[b]: lengths[b] + spans[b]], ids[pairs + b][lengths[b]: lengths[b] + spans[pairs + b]])
               for b in range(pairs)]
    prefix = 0
    if prefix_of_length is not None:  # the shared part of the prompts but their last tokens
        prefix = min(prefix_of_length([h[:-1] for h in heads]), min(len(h) - 1 for h in heads))
    packed = pack(heads, answers, prefix, MAX_ROW_TOKENS)

    device = input_ids.device
    packed_width = max(len(r) for r in packed.ids)

    def padded(values, fill):
        return torch.tensor([r + [fill] * (packed_width - len(r)) for r in values], dtype=torch.long, device=device)

    dtype = next(model.parameters()).dtype
    mask = attention_mask_4d(packed.groups, packed_width, kind, dtype, device)
    out = model(input_ids=padded(packed.ids, 0), attention_mask=mask, position_ids=padded(packed.positions, 0),
                shift_labels=padded(packed.targets, -100), fused_lm_head=True, use_cache=False)

    flat = torch.tensor([r * packed_width + c for row in packed.slots for r, c in row], dtype=torch.long, device=device)
    return in_trl_layout(out, answer, lambda values: values.reshape(-1)[flat])


def in_trl_layout(out, answer, answer_values):
    """TRL's fused-head output for full rows from `out`, a fused-head output laid out otherwise:
    `answer_values(field)` gives a field's values at the answer tokens, rows in order, each row's
    tokens in order; they go to TRL's layout (rows, width - 1), position t scored against token t + 1."""
    from trl.trainer.utils import FusedCausalLMOutput

    target = answer[:, 1:]

    def place(values):
        if values is None:
            return None
        return values.new_zeros(target.shape).masked_scatter(target, answer_values(values))

    log_probs = place(out.log_probs)
    return FusedCausalLMOutput(loss=-log_probs.sum() / target.sum().clamp(min=1), log_probs=log_probs,
                               entropy=place(out.entropy), log_sum_sq_probs=place(out.log_sum_sq_probs),
                               mean_logits=place(out.mean_logits), is_top1=place(out.is_top1), label_mask=target)


def packing_verdicts() -> dict[str, bool]:
    """What `packing_works` decided in this process, by "architecture/attention/dtype/device": for reports
    such as bench/device_check.py, which must say whether a run on a new device really trained packed."""
    return {"/".join(map(str, key)): ok for key, ok in _CHECKED.items()}


def packing_works(model, input_ids, attention_mask, labels, reference) -> bool:
    """Once per architecture/attention/dtype/device in a process: do the packed call and `reference`
    (the three-call path) give this batch the same answer log-probs? Eval mode, no gradients."""
    import torch

    from ..scoring import _base_model

    base = _base_model(model)
    dtype = next(model.parameters()).dtype
    key = (type(base).__name__, getattr(getattr(base, "config", None), "_attn_implementation", None), str(dtype),
           input_ids.device.type)
    if key not in _CHECKED:
        if mask_kind(model) is None or pair_layout(input_ids, labels) is None:  # nothing to check on: no verdict yet
            return False
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                packed = packed_pairs_forward(model, input_ids, attention_mask, labels)
                plain = reference(model, input_ids, attention_mask, labels)
            tolerance = 1e-4 if dtype == torch.float32 else 5e-2
            ok = packed is not None and bool((packed.log_probs - plain.log_probs).abs().max() <= tolerance)
        except Exception as error:  # noqa: BLE001 - any failure means: keep the three-call path
            print(f"Note: packing DPO pairs into one call failed on {type(base).__name__} ({type(error).__name__}: "
                  f"{error}); using one call per part instead (same results, slower).")
            ok = None
        finally:
            model.train(was_training)
        if ok is False:
            print(f"Note: {type(base).__name__} gives other log-probs with pairs packed into one call; using one "
                  "call per part instead (same results, slower).")
        _CHECKED[key] = bool(ok)
    return _CHECKED[key]
