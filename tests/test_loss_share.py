"""benchmarks/loss_share.py: the replayed batches are the training batches, and the shares add up."""

import pytest

from qtllava.config import load_config
from qtllava.data import IGNORE_INDEX, make_data
from qtllava.train.loop import load_tokenizer_for, stage_batches


@pytest.fixture(scope="module")
def loss_share(benchmark_module):
    return benchmark_module("loss_share")


def test_replay_matches_the_training_batches(loss_share, tmp_path):
    cfg = load_config("micro", [f'data.root="{tmp_path / "data"}"'])
    root = make_data(cfg.data, cfg.vision.image_size)
    turns = loss_share.stage_turns(cfg, "stage0")
    batches = stage_batches(cfg, "stage0", root, load_tokenizer_for(cfg, root))
    for step in range(4):
        labels = batches(step)[0]["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        starts = keep & ~(keep.roll(1, dims=1) & (labels.new_ones(labels.shape).cumsum(1) > 1))
        replay = loss_share.batch_turns(cfg, "stage0", turns, step)
        assert sum(n for _, n in replay) == int(keep.sum())  # label tokens, as the loss counts them
        assert len(replay) == int(starts.sum())  # assistant turns

    shares = loss_share.loss_shares(cfg, "stage0", steps=6)
    for key in ("turns", "token", "turn"):
        assert sum(s[key] for s in shares.values()) == pytest.approx(100.0)
    assert shares["caption"]["token"] > shares["caption"]["turn"]  # long answers weigh more per token
