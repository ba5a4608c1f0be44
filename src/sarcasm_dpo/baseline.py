"""Classical reference models: what a language model has to beat to be worth its cost.

`tfidf_logreg` is word 1-2-grams plus character 2-5-grams (within word boundaries), TF-IDF
weighted, into a logistic regression: it trains on the GEN train split in a couple of seconds on
a laptop. Where no training text has a word (two or more letters or digits: texts of emoji or
punctuation only), the word part has nothing to learn and scikit-learn refuses an empty vocabulary,
so the model is the character n-grams alone (`feature_kinds` says which it used).
`majority_class` predicts the training share of sarcastic texts for every input, the floor any
detector must clear. Both give P(sarcastic) through `predict_proba`, so they are scored by the same
metrics code as the language models. `check_baseline_train` says before any long work whether a
training file will do (both classes), and notes the character-only case.

    python -c "
    from sarcasm_dpo.data import load_split; from sarcasm_dpo.baseline import tfidf_logreg, predict_proba
    pipe = tfidf_logreg(load_split('data/splits/gen_train.csv'))
    print(predict_proba(pipe, ['Oh great, another Monday.', 'The meeting is at 3pm.']))"
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from .errors import UserError


# The two feature sets of `tfidf_logreg`; `has_words` asks the word set's own tokenizer.
WORD_FEATURES = {"analyzer": "word", "ngram_range": (1, 2), "sublinear_tf": True, "min_df": 1}
# char_wb n-grams catch spelling cues ("sooo", "!!!", "yeah right") that word n-grams split apart.
CHAR_FEATURES = {"analyzer": "char_wb", "ngram_range": (2, 5), "sublinear_tf": True, "min_df": 1}


def has_words(texts: Iterable) -> bool:
    """Whether any text holds a token the word features count (two or more letters or digits)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    analyze = TfidfVectorizer(**WORD_FEATURES).build_analyzer()
    return any(analyze(str(text)) for text in texts)


def check_baseline_train(texts: Iterable, labels: Iterable, path, log: Callable[[str], None] = print) -> None:
    """Read-only, before any model is loaded: will the baselines train on these texts and labels (of `path`)?

    Both classes are needed (UserError naming the file otherwise). Texts without a single word are no error:
    `tfidf_logreg` then uses character n-grams only, and `log` says so, naming the file."""
    texts = list(texts)
    _require_two_classes(labels, f"{path}, which the TF-IDF baseline trains on,")
    if not has_words(texts):
        log(f"Note: no text of {path} has a word (two or more letters or digits), so the TF-IDF baseline uses "
            f"character 2-5-grams only.")


def _require_two_classes(labels: Iterable, subject: str) -> None:
    """Refuse training labels of one class; `subject` names what holds them (it starts the message)."""
    labels = [int(label) for label in labels]
    if len(set(labels)) < 2:
        held = (f"only label {labels[0]} ({len(labels)} text(s), all "
                f"{'sarcastic' if labels[0] == 1 else 'not sarcastic'})" if labels else "no texts")
        raise UserError(f"{subject} holds {held}: a classifier needs sarcastic and non-sarcastic training "
                        "texts. Pass a training file with both (--train_csv; `sarcasm-dpo split` writes "
                        "data/splits/gen_train.csv), or --no_baseline to skip the baseline.")


def tfidf_logreg(train_df: pd.DataFrame, seed: int = 42):
    """A fitted sklearn Pipeline: word + char TF-IDF features (char alone where no text has a word) ->
    logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline

    texts = train_df["text"].astype(str).tolist()
    _require_two_classes(train_df["label"], "The TF-IDF baseline's training split")
    kinds = [("word", WORD_FEATURES)] if has_words(texts) else []
    features = FeatureUnion([(name, TfidfVectorizer(**options)) for name, options in [*kinds, ("char", CHAR_FEATURES)]])
    pipe = Pipeline([("features", features), ("logreg", LogisticRegression(max_iter=1000, random_state=seed))])
    pipe.fit(texts, train_df["label"].astype(int).to_numpy())
    return pipe


def feature_kinds(pipe) -> list[str]:
    """Which feature sets a fitted `tfidf_logreg` uses: ["word", "char"], or ["char"] where no text had a word."""
    return [name for name, _ in pipe.named_steps["features"].transformer_list]


def majority_class(train_df: pd.DataFrame):
    """A constant model: P(sarcastic) = the sarcastic share of the training split, for every text."""
    from sklearn.dummy import DummyClassifier

    _require_two_classes(train_df["label"], "The majority-class baseline's training split")
    model = DummyClassifier(strategy="prior")
    # The dummy ignores its features; one column of zeros keeps sklearn's input checks happy.
    model.fit(np.zeros((len(train_df), 1)), train_df["label"].astype(int).to_numpy())
    return model


def predict_proba(model, texts: Sequence[str]) -> np.ndarray:
    """P(sarcastic) for each text from a fitted baseline (either kind above)."""
    texts = [str(t) for t in texts]
    if not texts:
        return np.zeros(0, dtype=np.float64)
    inputs = np.zeros((len(texts), 1)) if model.__class__.__name__ == "DummyClassifier" else texts
    column = list(model.classes_).index(1)
    return model.predict_proba(inputs)[:, column].astype(np.float64)
