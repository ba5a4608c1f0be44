# SFT on GEN train + iSarcasmEval train tweets (one epoch), then GEN and iSarcasmEval validation scored for it and
# for the GEN-only adapters (bench/README.md, "Tweets in SFT"). Run from the repository root, 2026-11-27, commit 3e4178c.
mkdir -p bench/work/sft_mixed
.venv/bin/python -c "
import pandas as pd
from sarcasm_dpo.data import load_split
pd.concat([load_split('data/splits/gen_train.csv'), load_split('data/splits/isarcasm_train.csv')],
          ignore_index=True).to_csv('bench/work/sft_mixed/gen_plus_isarcasm_train.csv', index=False)"
/usr/bin/time -v .venv/bin/sarcasm-dpo sft --config configs/smollm2-135m-cpu.yaml --no_wandb --epochs 1 \
  --train_csv bench/work/sft_mixed/gen_plus_isarcasm_train.csv --output_dir bench/work/sft_mixed/sft
echo "SFT EXIT $?"
.venv/bin/python - <<'PY'
import json, numpy as np
from sklearn.metrics import roc_auc_score, f1_score, precision_recall_curve, balanced_accuracy_score
from sarcasm_dpo.data import load_split
from sarcasm_dpo.detector import SarcasmDetector
out = {}
gv, iv = load_split("data/splits/gen_val.csv"), load_split("data/splits/isarcasm_val.csv")
for name, adapter in (("gen_only_1ep", "models/smollm2/sft"), ("gen_only_2ep", "models/smollm2/sft_2ep"),
                      ("gen_plus_isarcasm_1ep", "bench/work/sft_mixed/sft")):
    d = SarcasmDetector.load(adapter=adapter, batch_size=16)
    row = {"adapter": adapter, "threshold": d.threshold, "max_text_tokens": d.max_text_tokens}
    for split, frame in (("gen_val", gv), ("isarcasm_val", iv)):
        p = np.asarray(d.predict_proba(frame.text.tolist())); y = frame.label.to_numpy()
        pr, rc, _ = precision_recall_curve(y, p)
        row[split] = {"n": len(y), "roc_auc": roc_auc_score(y, p), "f1_at_own_threshold": f1_score(y, p >= d.threshold),
                      "balanced_accuracy_at_own_threshold": balanced_accuracy_score(y, p >= d.threshold),
                      "f1_at_0.5": f1_score(y, p >= 0.5), "best_f1_any_cut_in_sample": float((2*pr*rc/np.maximum(pr+rc,1e-12)).max())}
    out[name] = row
    print(name, json.dumps(row, indent=1), flush=True)
json.dump(out, open("bench/results/sft_mixed_tweets/validation_scores.json", "w"), indent=1)
PY
echo "SCORE EXIT $?"
