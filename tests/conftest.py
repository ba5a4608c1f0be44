"""Shared fixtures: a tiny random Qwen2 chat model built locally (no download) and the real data.

The model is random, so tests about *learning* use toy sets it can fit (see `toy_rows`); tests
about plumbing use the real GEN / iSarcasmEval files from ../shared/data.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
GEN_CSV = SHARED_DATA / "sarcasm_v2" / "GEN-sarc-notsarc.csv"
ISARCASM_CSV = SHARED_DATA / "isarcasmeval" / "train.En.csv"

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder with a 2-layer random Qwen2 model and a byte-level BPE tokenizer with Qwen's chat format."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not GEN_CSV.is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


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
    import device_check
    import qwen_tokenizer
    import speed

    return speed.random_qwen_model(tmp_path_factory.mktemp("tiny-qwen-real") / "model", str(qwen_tokenizer_dir), 0,
                                   vocab_size=qwen_tokenizer.QWEN25_VOCAB_SIZE, **device_check.TINY_SHAPE)
