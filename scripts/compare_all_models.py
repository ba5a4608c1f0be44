#!/usr/bin/env python
"""Compare Base, SFT and DPO on the held-out GEN test split.

Kept for users of the original scripts: the same flags, now a door into `sarcasm-dpo compare`.

    python scripts/compare_all_models.py --help
"""

import sys
from pathlib import Path

# Run from a checkout without installing: fall back to the package under src/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sarcasm_dpo.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
