"""The loss averages: per token (as HF) and per assistant turn."""

import pytest
import torch
import torch.nn.functional as F

from qtllava.config import ConfigError, load_config
from qtllava.model.loss import IGNORE_INDEX, label_weights, lm_loss

X = IGNORE_INDEX


def test_turn_weights_hand_worked():
    # row 0: a 3-token turn then a 1-token turn; row 1: one 2-token turn that runs to the row's end
    target = torch.tensor([[X, 5, 6, 7, X, X, 8], [X, X, X, X, X, 1, 2]])
    w = label_weights(target, "turn")
    third = 1 / 3
    expect = torch.tensor([[0, third / 3, third / 3, third / 3, 0, 0, third], [0, 0, 0, 0, 0, third / 2, third / 2]])
    torch.testing.assert_close(w, expect)
    tok = label_weights(target, "token")
    torch.testing.assert_close(tok, (target != X).float() / 6)


def test_turns_do_not_run_across_rows():
    target = torch.tensor([[X, 1, 2], [3, X, X]])  # row 0 ends in a turn, row 1 starts with one: two turns
    w = label_weights(target, "turn")
    torch.testing.assert_close(w, torch.tensor([[0, 0.25, 0.25], [0.5, 0, 0]]))


def test_no_labels_gives_zero_weights_and_unknown_average_raises():
    assert label_weights(torch.full((2, 3), X), "turn").sum() == 0
    with pytest.raises(ValueError, match="unknown loss average"):
        label_weights(torch.zeros(1, 2, dtype=torch.long), "sample")


def test_weighted_loss_is_the_weighted_mean_of_token_losses():
    torch.manual_seed(0)
    logits, target = torch.randn(5, 7), torch.tensor([1, 2, 3, 4, 5])
    w = torch.tensor([0.5, 0.125, 0.125, 0.125, 0.125])
    ce = F.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(lm_loss(logits, target, w), (ce * w).sum())
    torch.testing.assert_close(lm_loss(logits, target), ce.mean())


def test_config_checks_the_average():
    assert load_config("micro", ["train.loss_average='turn'"]).train.loss_average == "turn"
    with pytest.raises(ConfigError, match="train.loss_average"):
        load_config("micro", ["train.loss_average='sample'"])
