#!/usr/bin/env python
"""Phase 2, DPO on iSarcasmEval from the SFT adapter.

Kept for users of the original scripts: the same flags, now a door into `sarcasm-dpo dpo`.

    python scripts/dpo_train_v2.py --help
"""

import sys
from pathlib import Path

# Run from a checkout without installing: fall back to the package under src/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sarcasm_dpo.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["dpo", *sys.argv[1:]]))
