"""model.kind = "transformer" on data.dataset = "text": the generated corpus follows its rule
(negation flips a sentiment word), the example config trains well above chance, and configs
that cannot work fail with one clear line."""

from pathlib import Path

import numpy as np
import pytest

from shardgrad.runtime import config as cfg
from shardgrad.runtime.data import TEXT_NOT, TEXT_WORDS, load_text
from shardgrad.runtime.train import train

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "text_transformer.toml"


def rule(row) -> int:
    total = 0
    for i, t in enumerate(row):
        if 2 <= t < 2 + 2 * TEXT_WORDS:
            sign = 1 if t < 2 + TEXT_WORDS else -1
            total += -sign if i and row[i - 1] == TEXT_NOT else sign
    return int(total > 0)


def test_corpus_labels_follow_the_negation_rule_and_are_reproducible():
    data = load_text(n=600, seed=3)
    again = load_text(n=600, seed=3)
    np.testing.assert_array_equal(data.x_train, again.x_train)
    assert data.x_train.dtype == np.int64 and data.num_classes == 2
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        assert [rule(r) for r in x] == y.tolist()
    assert 0.4 < data.y_train.mean() < 0.6
    negated = np.mean([(r == TEXT_NOT).any() for r in data.x_train])
    assert negated > 0.3                     # a bag of words cannot read these rows


@pytest.mark.timeout(300)
def test_the_example_trains_well_above_chance():
    summary = train(cfg.load_config(EXAMPLE, ["train.epochs=3"]), None)
    assert summary["test_accuracy"] > 0.75, summary


@pytest.mark.parametrize("sets,message", [
    (["data.dataset=digits"], "needs integer token ids"),
    (["model.heads=3"], "must divide model.d_model"),
])
def test_configs_that_cannot_work_fail_with_one_line(sets, message):
    with pytest.raises(cfg.ConfigError, match=message):
        train(cfg.load_config(EXAMPLE, sets), None)
