"""Classical reference models: what a language model has to beat to be worth its cost.

`tfidf_logreg` is word 1-2-grams plus character 2-5-grams (within word boundaries), TF-IDF
weighted, into a logistic regression: it trains on the GEN train split in a couple of seconds on
a laptop. `majority_class` predicts the training share of sarcastic texts for every input, the
floor any detector must clear. Both give P(sarcastic) through `predict_proba`, so they are scored
by the same metrics code as the language models.

    python -c "
    from sarcasm_dpo.data import load_split; from sarcasm_dpo.baseline import tfidf_logreg, predict_proba
    pipe = tfidf_logreg(load_split('data/splits/gen_train.csv'))
    print(predict_proba(pipe, ['Oh great, another Monday.', 'The meeting is at 3pm.']))"
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .errors import UserError


def _check_two_classes(train_df: pd.DataFrame, what: str) -> None:
    if train_df["label"].nunique() < 2:
        raise UserError(f"The {what} needs both sarcastic and non-sarcastic training texts; the training split holds "
                        f"only label {int(train_df['label'].iloc[0])}.")


def tfidf_logreg(train_df: pd.DataFrame, seed: int = 42):
    """A fitted sklearn Pipeline: word + char TF-IDF features -> logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline
    from sklearn.feature_extraction.text import TfidfVectorizer

    _check_two_classes(train_df, "TF-IDF baseline")
    features = FeatureUnion([
        ("word", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=1)),
        # char_wb n-grams catch spelling cues ("sooo", "!!!", "yeah right") that word n-grams split apart.
        ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=1)),
    ])
    pipe = Pipeline([("features", features), ("logreg", LogisticRegression(max_iter=1000, random_state=seed))])
    pipe.fit(train_df["text"].astype(str).tolist(), train_df["label"].astype(int).to_numpy())
    return pipe


def majority_class(train_df: pd.DataFrame):
    """A constant model: P(sarcastic) = the sarcastic share of the training split, for every text."""
    from sklearn.dummy import DummyClassifier

    _check_two_classes(train_df, "majority-class baseline")
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
