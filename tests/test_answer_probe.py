"""benchmarks/answer_probe.py: the logit lens read after the last decoder layer is the model's own prediction."""

import pytest
import torch

from qtllava.config import load_config
from qtllava.data import make_data
from qtllava.model.parts import ServerPart
from qtllava.train.loop import run_stage


@pytest.fixture(scope="module")
def answer_probe(benchmark_module):
    return benchmark_module("answer_probe")


def test_lens_last_layer_is_the_models_prediction(answer_probe, tmp_path):
    cfg = load_config("micro", ["train.stage0.steps=30"])
    root = make_data(cfg.data, cfg.vision.image_size, root=tmp_path / "data")
    final = run_stage(cfg, "stage0", root, tmp_path / "s0", progress=False).final
    # a final norm with uneven weights: reading the last state through it a second time would change the argmax
    server = ServerPart.from_pretrained(final / "server")
    with torch.no_grad():
        server.llm.model.norm.weight.copy_(torch.rand(server.hidden_size, generator=torch.Generator().manual_seed(0)))
    server.save_pretrained(final / "server")

    table = answer_probe.probe(final, cfg, root, "instruct_val.json", batch_size=8, limit=0)
    lens = answer_probe.lens_probe(final, cfg, root, "instruct_val.json", batch_size=8, limit=0)
    assert set(lens) == set(table)
    assert any(0 < r["accuracy"] for r in table.values())  # the comparison below is not all zeros
    for kind, accs in lens.items():
        assert len(accs) == cfg.llm.num_layers + 1  # the embeddings, then one entry per decoder layer
        assert accs[-1] == pytest.approx(table[kind]["accuracy"]), kind
