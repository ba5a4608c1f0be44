"""Qwen2.5's real tokenizer, built offline from the BPE ranks that the `dashscope` wheel ships.

    python bench/qwen_tokenizer.py                 # build (or find) it; prints the tokenizer folder
    python bench/qwen_tokenizer.py --copy_to DIR   # and copy that folder to DIR (bench/device_prepare.sh)

The hub is out of reach on these machines, but PyPI is not: `dashscope` (Alibaba's API client)
carries `dashscope/resources/qwen.tiktoken`, Qwen's byte-level BPE ranks (151,643 tokens). This
module downloads that wheel once with pip, keeps only the ranks file (sha256 pinned), converts it
with transformers' `TikTokenConverter` (Qwen2's split regex, NFC, byte level, no prefix space),
adds Qwen2.5's 22 added tokens with their ids and Qwen2.5-Instruct's chat template, and saves a
Hugging Face tokenizer folder. Both are cached in `~/.cache/sarcasm-dpo/qwen/`
(`SARCASM_DPO_QWEN_CACHE` moves it); a cache hit runs no pip. Neither is committed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DASHSCOPE = "dashscope==2.0.2"  # the wheel the ranks come from, pinned with the file's hash below
RANKS_MEMBER = "dashscope/resources/qwen.tiktoken"
RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
RANKS_COUNT = 151_643
CACHE_ENV = "SARCASM_DPO_QWEN_CACHE"
BUILD_VERSION = 1  # bump when the folder built from the ranks changes, so cached folders are rebuilt
# Qwen2.5's embedding rows: its 151,665 tokens padded to a multiple of 128 (config.json vocab_size).
QWEN25_VOCAB_SIZE = 151_936

# Qwen2's pre-tokenizer split (tokenizer.json): digits one at a time, unlike tiktoken's cl100k \p{N}{1,3}.
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
# Qwen2.5's added tokens after the ranks, in id order from 151,643 (tokenizer_config.json's
# added_tokens_decoder); True = special (skipped by decode(skip_special_tokens=True)).
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Instruct's chat template (tokenizer_config.json), tool calls included.
CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- '" + DEFAULT_SYSTEM + "' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


class Unavailable(RuntimeError):
    """The ranks cannot be had here (no package index, a changed file): one line says why."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sarcasm-dpo" / "qwen").expanduser()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ranks_file(cache: Path | None = None) -> Path:
    """The verified `qwen.tiktoken`, downloaded with pip on first use and kept in the cache."""
    cache = cache or cache_dir()
    target = cache / "qwen.tiktoken"
    if target.is_file() and _sha256(target) == RANKS_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", tmp, DASHSCOPE]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"pip download {DASHSCOPE} failed: {exc}") from None
        wheels = list(Path(tmp).glob("dashscope-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise Unavailable(f"pip download {DASHSCOPE} failed (no package index?): {last}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(RANKS_MEMBER)
        if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
            raise Unavailable(f"{RANKS_MEMBER} in {wheels[0].name} does not have the pinned sha256 {RANKS_SHA256}")
        part = Path(tmp) / "qwen.tiktoken"
        part.write_bytes(data)
        os.replace(part, target)  # same file system: atomic, so a reader never sees half a file
    return target


def read_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken's format (base64 token, space, rank per line), read without the tiktoken package."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != RANKS_COUNT or sorted(ranks.values()) != list(range(RANKS_COUNT)):
        raise Unavailable(f"{path} does not hold ranks 0..{RANKS_COUNT - 1}")
    return ranks


def build_tokenizer(ranks_path: Path):
    """A PreTrainedTokenizerFast that tokenizes like Qwen2.5-Instruct's, from the ranks file."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class QwenConverter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url):  # the same dict tiktoken.load would return
            return read_ranks(Path(tiktoken_url))

    backend = QwenConverter(vocab_file=str(ranks_path), pattern=PATTERN, add_prefix_space=False).converted()
    backend.normalizer = normalizers.NFC()
    added = [AddedToken(text, special=special, normalized=False) for text, special in ADDED_TOKENS]
    backend.add_tokens(added)  # ids follow the ranks in this order: 151,643, 151,644, ...
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        additional_special_tokens=[t for t, special in ADDED_TOKENS[1:] if special and t != "<|im_end|>"],
        chat_template=CHAT_TEMPLATE, model_max_length=131_072, clean_up_tokenization_spaces=False,
        split_special_tokens=False, errors="replace")
    for offset, (text, _) in enumerate(ADDED_TOKENS):
        if tokenizer.convert_tokens_to_ids(text) != RANKS_COUNT + offset:
            raise RuntimeError(f"{text} got id {tokenizer.convert_tokens_to_ids(text)}, not {RANKS_COUNT + offset}")
    return tokenizer


def tokenizer_dir(cache: Path | None = None) -> Path:
    """The saved tokenizer folder (built once; the ranks fetched first if they are not cached)."""
    cache = cache or cache_dir()
    folder = cache / "tokenizer"
    stamp = {"ranks_sha256": RANKS_SHA256, "build_version": BUILD_VERSION}
    marker = folder / "built_from.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return folder
    tokenizer = build_tokenizer(ranks_file(cache))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix="tokenizer."))
    tmp.chmod(0o755)  # mkdtemp makes it private; the folder is copied and read by other users' jobs
    tokenizer.save_pretrained(str(tmp))
    (tmp / "built_from.json").write_text(json.dumps(stamp))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load(cache: Path | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(cache)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copy_to", default=None, help="Also copy the tokenizer folder here (replaced if present).")
    args = p.parse_args(argv)
    try:
        folder = tokenizer_dir()
    except Unavailable as exc:
        print(f"Qwen tokenizer unavailable: {exc}", file=sys.stderr)
        return 2
    if args.copy_to:
        dest = Path(args.copy_to)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(folder, dest)
        folder = dest
    print(folder)
    return 0


if __name__ == "__main__":
    import common  # this folder is on sys.path when a file in it runs as a script

    common.run_main(main)
