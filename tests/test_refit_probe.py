"""benchmarks/refit_probe.py: the wrapped training step refits the server's fsq image decoder on the client's rows,
and the straight-through decoder hands on the fitted rows forward and the gradient unchanged backward."""

import pytest
import torch

from qtllava.compress.fsq import FsqDecoder
from qtllava.config import load_config
from qtllava.data import make_data
from qtllava.train.client_runtime import ClientRuntime
from qtllava.train.loop import run_stage


@pytest.fixture(scope="module")
def rp(benchmark_module):
    return benchmark_module("refit_probe")


def test_straight_through_decoder(rp):
    dec = FsqDecoder(16, 16, 2)
    with torch.no_grad():
        dec.proj.weight.copy_(torch.randn(16, 16))
    v = torch.randn(5, 16, requires_grad=True)
    out = rp._straight_through_forward(dec, v)
    assert torch.allclose(out, FsqDecoder.forward(dec, v), atol=1e-6)  # the fitted map's output forward
    g = torch.randn(5, 16)
    (out * g).sum().backward()
    assert torch.equal(v.grad, g)  # identity backward


def test_training_step_refits_the_image_decoder(rp, tmp_path, monkeypatch):
    cfg = load_config("micro", ["train.stage0.steps=2", "train.stage1.steps=3", 'compress.image.name="fsq"',
                                "compress.image.levels=2"])
    root = make_data(cfg.data, cfg.vision.image_size, root=tmp_path / "data")
    base = run_stage(cfg, "stage0", root, tmp_path / "s0", progress=False).final
    seen = []
    original = ClientRuntime.train_step

    def spy(self, micro):  # runs after the refit: the fitted decoder is in place for this step
        dec = self.link.handler.part.image_codec
        seen.append((dec.out_scale.item(), dec.proj.weight.detach().clone(), dec.forward.__func__.__name__))
        return original(self, micro)

    monkeypatch.setattr(ClientRuntime, "train_step", rp.refit_step(spy, every=2, window=2))
    run = run_stage(cfg, "stage1", root, tmp_path / "s1", init=base, progress=False)
    assert run.steps == 3 and len(seen) == 3
    assert all(name == "_straight_through_forward" for _, _, name in seen)
    fresh = FsqDecoder(*(seen[0][1].shape[::-1]), 2).proj.weight
    assert not torch.allclose(seen[0][1], fresh)  # refitted before step 0: no longer the identity
    assert torch.equal(seen[1][1], seen[0][1])  # step 1: no refit (every 2 steps), nothing trains the frozen map
    assert not torch.equal(seen[2][1], seen[1][1])  # step 2: refitted on the connector's newer rows
