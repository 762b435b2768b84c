"""One checkpoint under attack: victim sessions, attackers, and the scored results of each attack.

`PrivacyRun` builds everything lazily and caches it, so the benchmark trains each attacker's inversion network once
and scores it on every image set, while `qtllava attack` builds only what one attack needs. Scoring (the only place
that touches the `Truth`) lives here, apart from the attacks in `attacks.py`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qtllava.data.templates import template_name
from qtllava.config import Config
from qtllava.data import LlavaDataset, image_token_id
from qtllava.model.parts import ClientPart, ServerPart
from qtllava.privacy import attacks as A
from qtllava.privacy.images import (IMAGE_SETS, AuxImages, VictimSet, aux_images, data_signatures, fashion_available,
                                    fashion_set, scene_set, skimage_set, to_pixels, to_unit)
from qtllava.privacy.metrics import image_scores, roc_auc, token_accuracy
from qtllava.privacy.nets import InversionConfig, Probe
from qtllava.privacy.probes import (FASHION_CHANCE, N_CELLS, N_COLORS, SCENE_CHANCE, fashion_semantic, scene_semantic,
                                    train_fashion_probe, train_scene_probe)
from qtllava.privacy.session import Truth, checkpoint_config, record_session
from qtllava.privacy.surrogate import build_surrogate, train_surrogate
from qtllava.privacy.wire import Capture
from qtllava.train.loop import load_tokenizer_for
from qtllava.train.ucut import load_head_weight

__all__ = ["ATTACKS", "ATTACKERS", "SuiteSettings", "micro_settings", "config_label", "find_base", "PrivacyRun",
           "FashionMissing"]

log = logging.getLogger(__name__)

ATTACKS = ("image", "text", "labels")
ATTACKERS = ("white", "black")


class FashionMissing(RuntimeError):
    """Fashion-MNIST is not installed (Debian package dataset-fashion-mnist)."""


@dataclass
class SuiteSettings:
    """Sizes of the attacker's and evaluator's work; the defaults are the benchmark's (tiny preset, CPU)."""

    inversion: InversionConfig = field(default_factory=InversionConfig)
    aux_scenes: int = 4000  # attacker's own generator scenes
    aux_fashion: int = 3000  # attacker's Fashion-MNIST training images (when installed)
    aux_crops: int = 1000  # attacker's random crops of non-evaluation scikit-image pictures
    aux_seed: int = 7_000_003
    surrogate_captions: int = 1500  # captioned scenes the black-box attacker trains its surrogate on
    surrogate_steps: int = 150
    surrogate_batch: int = 8
    surrogate_lr: float = 1e-3
    text_steps: int = 600
    probe_images: int = 3000
    probe_steps: int = 2500
    probe_seed: int = 9_000_011
    eval_limit: int | None = None  # samples per victim set (None: all of instruct_val; 200 fashion images)
    fashion_eval: int = 200
    batch_size: int = 8  # the victim's micro-batch
    traffic_samples: int = 256  # training samples whose messages the black-box attacker aligns its surrogate to
    seed: int = 0


def micro_settings() -> SuiteSettings:
    """Tiny sizes for tests on the micro preset (seconds, not a meaningful attack)."""
    return SuiteSettings(inversion=InversionConfig(width=32, depth=1, heads=2, steps=30, batch_size=16),
                         aux_scenes=48, aux_fashion=16, aux_crops=8, surrogate_captions=16, surrogate_steps=3,
                         surrogate_batch=4, text_steps=20, probe_images=64, probe_steps=20, eval_limit=8,
                         fashion_eval=8, batch_size=4, traffic_samples=8)


def config_label(cfg: Config) -> str:
    """Name of the codec setting, as the study names its runs: fp16, fsq-L4-ans, fsq-L2-pack, nf2, topk2."""
    c = cfg.compress.image
    if c.name == "identity":
        return c.dtype
    if c.name == "fsq":
        return f"fsq-L{c.levels}-{c.coder}"
    if c.name in ("nf", "topk"):
        return f"{c.name}{c.bits}"
    return c.name


def find_base(checkpoint: Path) -> Path | None:
    """The stage-0 final folder beside a stage's final folder (<run>/stage2/final -> <run>/stage0/final), if any."""
    cand = Path(checkpoint).resolve().parent.parent / "stage0" / "final"
    return cand if (cand / "DONE").exists() else None


class PrivacyRun:
    """Attacks on one checkpoint (a stage's final folder with client/ and server/)."""

    def __init__(self, checkpoint: str | Path, data_root: str | Path, work: str | Path,
                 settings: SuiteSettings | None = None, base: str | Path | None = None,
                 probe_dir: str | Path | None = None):
        self.checkpoint = Path(checkpoint)
        self.data_root = Path(data_root)
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.probe_dir = Path(probe_dir) if probe_dir else self.work  # probes depend only on the image size
        self.probe_dir.mkdir(parents=True, exist_ok=True)
        self.s = settings or SuiteSettings()
        self.base = Path(base) if base else find_base(self.checkpoint)
        self.cfg = checkpoint_config(self.checkpoint)
        self.label = config_label(self.cfg)
        self.tok = load_tokenizer_for(self.cfg, self.data_root)
        self.server = ServerPart.from_pretrained(self.checkpoint / "server")  # the attacker's own half
        self.server.requires_grad_(False)
        self._sets: dict[str, VictimSet] = {}
        self._captures: dict[tuple[str, str], tuple[Capture, Truth]] = {}
        self._clients: dict[str, ClientPart] = {}
        self._aux: tuple[AuxImages, torch.Tensor, torch.Tensor] | None = None
        self._inverters: dict[str, A.InversionNet] = {}
        self._probes: dict[str, Probe] = {}
        self._classifiers: dict[str, A.TextClassifier] = {}
        self._align: dict[str, A.Alignment] = {}
        self.timings: dict[str, float] = {}

    @property
    def image_size(self) -> int:
        return self.cfg.vision.image_size

    # --- the victim ---------------------------------------------------------------------------------------------

    def victim_set(self, name: str) -> VictimSet:
        if name not in IMAGE_SETS:
            raise ValueError(f"unknown image set {name!r}; known: {', '.join(IMAGE_SETS)}")
        if name not in self._sets:
            tpl = template_name(self.cfg)
            if name == "scenes":
                self._sets[name] = scene_set(self.data_root, tpl, self.s.eval_limit, self.work / "victim")
            elif name == "fashion":
                if not fashion_available():
                    raise FashionMissing("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); "
                                         "the fashion image set is skipped")
                self._sets[name] = fashion_set(self.work / "victim", self.image_size, tpl, self.s.fashion_eval)
            else:
                self._sets[name] = skimage_set(self.work / "victim", self.image_size, tpl)
        return self._sets[name]

    def capture(self, image_set: str, cut: str = "paper") -> tuple[Capture, Truth]:
        key = (image_set, cut)
        if key not in self._captures:
            t0 = time.perf_counter()
            self._captures[key] = record_session(self.checkpoint, self.victim_set(image_set), self.data_root, cut=cut,
                                                 batch_size=self.s.batch_size, limit=self.s.eval_limit)
            self.timings[f"session-{image_set}-{cut}"] = time.perf_counter() - t0
        return self._captures[key]

    def observed_traffic(self) -> Capture:
        """Messages of ordinary training traffic (the first samples of the client's instruction corpus), which the
        server sees anyway; the black-box attacker aligns its surrogate to them. Not used for scoring."""
        key = ("traffic", "paper")
        if key not in self._captures:
            vs = scene_set(self.data_root, template_name(self.cfg), self.s.traffic_samples, self.work / "victim",
                           split="instruct_train")
            self._captures[key] = record_session(self.checkpoint, vs, self.data_root, batch_size=self.s.batch_size,
                                                 limit=self.s.traffic_samples)
        return self._captures[key][0]

    # --- the attacker -------------------------------------------------------------------------------------------

    def aux(self) -> tuple[AuxImages, torch.Tensor, torch.Tensor]:
        """The attacker's images -> (AuxImages, normalised pixels, the same in [0, 1])."""
        if self._aux is None:
            v = self.cfg.vision
            aux = aux_images(self.image_size, self.s.aux_scenes, self.s.aux_fashion, self.s.aux_crops, self.s.aux_seed,
                             exclude=data_signatures(self.data_root))
            px = torch.stack([to_pixels(im, self.image_size, v.image_mean, v.image_std) for im in aux.images])
            self._aux = (aux, px, to_unit(px, v.image_mean, v.image_std))
        return self._aux

    def client(self, attacker: str) -> ClientPart:
        """The white-box attacker's leaked client part, or the black-box attacker's trained surrogate."""
        if attacker not in ATTACKERS:
            raise ValueError(f"unknown attacker {attacker!r}; known: {', '.join(ATTACKERS)}")
        if attacker not in self._clients:
            if attacker == "white":
                part = ClientPart.from_pretrained(self.checkpoint / "client")
                part.requires_grad_(False)
            else:
                t0 = time.perf_counter()
                part = build_surrogate(self.cfg, len(self.tok), image_token_id(self.tok), self.base)
                data = self._surrogate_data()
                train_surrogate(part, self.server, data, self.tok.pad_token_id, self.s.surrogate_steps,
                                self.s.surrogate_batch, self.s.surrogate_lr, self.s.seed, train_tower=self.base is None)
                self.timings["surrogate"] = time.perf_counter() - t0
            self._clients[attacker] = part
        return self._clients[attacker]

    def _surrogate_data(self) -> LlavaDataset:
        """The attacker's captioned scenes as a LLaVA-JSON caption corpus (pretrain template)."""
        aux, _, _ = self.aux()
        folder = self.work / "attacker"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        records = []
        for i, (prompt, cap) in enumerate(aux.captions[:self.s.surrogate_captions]):
            aux.images[i].save(folder / "images" / f"aux-{i:05d}.png")
            records.append({"id": f"aux-{i:05d}", "image": f"aux-{i:05d}.png", "conversations": [
                {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": cap}]})
        path = folder / "captions.json"
        path.write_text(json.dumps(records))
        return LlavaDataset.for_config(self.cfg, path, folder / "images", self.tok, "pretrain", skip_bad=True)

    def inverter(self, attacker: str) -> A.InversionNet:
        """The attacker's inversion network (cached in the work folder); the black-box attacker also fits the
        alignment of observed wire rows to its surrogate's rows."""
        if attacker not in self._inverters:
            inv = self.s.inversion
            file = self.work / (f"inverter-{attacker}-w{inv.width}d{inv.depth}s{inv.steps}b{inv.batch_size}-"
                                f"{self._checkpoint_key()}.pt")
            net = A.InversionNet(self._d_code(), self.cfg.vision.num_image_tokens, self.image_size, inv)
            if file.is_file():
                blob = torch.load(file, weights_only=True)
                net.load_state_dict(blob["net"])
                if "align" in blob:
                    self._align[attacker] = A.Alignment(*blob["align"])
            else:
                client = self.client(attacker)
                aux, px, unit = self.aux()
                t0 = time.perf_counter()
                rows = A.client_image_rows(client, px, self.s.batch_size)
                net, hist = A.train_inverter(rows, unit, inv, self.s.seed)
                log.info("%s %s inverter: loss %.4f -> %.4f", self.label, attacker, hist[0], hist[-1])
                blob = {"net": net.state_dict()}
                if attacker == "black":
                    scenes = torch.tensor([s == "scenes" for s in aux.source])
                    wire = A.wire_image_rows(self.observed_traffic(), self.server, rows.shape[1])
                    al = A.fit_alignment(wire, rows[scenes])
                    self._align[attacker] = al
                    blob["align"] = [al.mu_wire, al.mu_surrogate, al.m]
                torch.save(blob, file)
                self.timings[f"inverter-{attacker}"] = time.perf_counter() - t0
            self._inverters[attacker] = net
        return self._inverters[attacker]

    def _checkpoint_key(self) -> str:
        """Short hash naming the checkpoint's weights, so a cached network never outlives a retrained checkpoint."""
        import hashlib

        st = (self.checkpoint / "client" / "model.safetensors").stat()
        key = f"{self.checkpoint.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        return hashlib.sha256(key.encode()).hexdigest()[:10]

    def _d_code(self) -> int:
        """Width of the image rows on the wire, from the announced configuration (fsq's d_code, else D)."""
        c = self.cfg.compress.image
        return (c.d_code or self.server.hidden_size) if c.name == "fsq" else self.server.hidden_size

    # --- scored attacks -----------------------------------------------------------------------------------------

    def probe(self, image_set: str) -> Probe | None:
        """The evaluator's semantic probe for an image set (None for skimage); cached in the work folder."""
        if image_set == "skimage":
            return None
        if image_set not in self._probes:
            s = self.s
            file = self.probe_dir / f"probe-{image_set}-{self.image_size}px-{s.probe_images}x{s.probe_steps}.pt"
            if file.is_file():
                probe = Probe(self.image_size, 10 if image_set == "fashion" else N_COLORS * (2 + N_CELLS))
                probe.load_state_dict(torch.load(file, weights_only=True))
            elif image_set == "scenes":
                probe = train_scene_probe(self.image_size, s.probe_images, s.probe_steps, s.probe_seed,
                                          exclude=data_signatures(self.data_root))
            else:
                probe = train_fashion_probe(self.image_size, s.probe_images, s.probe_steps, s.probe_seed)
            torch.save(probe.state_dict(), file)
            self._probes[image_set] = probe
        return self._probes[image_set]

    def _semantic(self, image_set: str, images: torch.Tensor, truth: Truth) -> dict:
        vs = self.victim_set(image_set)
        probe = self.probe(image_set)
        if image_set == "scenes":
            keep = [i for i, rid in enumerate(truth.ids) if rid in vs.objects]
            out = scene_semantic(probe, images[keep], [vs.objects[truth.ids[i]] for i in keep])
            out.update(semantic_chance=SCENE_CHANCE, semantic_images=len(keep))
            return out
        if image_set == "fashion":
            acc = fashion_semantic(probe, images, [vs.classes[r] for r in truth.ids])
            return {"semantic": acc, "semantic_chance": FASHION_CHANCE, "semantic_images": len(truth.ids)}
        return {"semantic": None, "semantic_chance": None, "semantic_images": 0}

    def image_attack(self, attacker: str, image_set: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """-> (row of scores, originals, reconstructions)."""
        capture, truth = self.capture(image_set)
        recon = A.invert(self.inverter(attacker), capture, self.server, self._align.get(attacker))
        orig = truth.image_tensor()
        row = {"config": self.label, "attacker": attacker, "image_set": image_set, **image_scores(orig, recon)}
        sem = self._semantic(image_set, recon, truth)
        clean = self._semantic(image_set, orig, truth)
        row.update(sem)
        row["semantic_clean"] = clean["semantic"]
        return row, orig, recon

    def mean_image_baseline(self, image_set: str) -> dict:
        """Scores of a guess that ignores the wire: the attacker's mean auxiliary image for every image (what an
        inversion must beat to have learned anything from the messages)."""
        _, truth = self.capture(image_set)
        _, _, unit = self.aux()
        orig = truth.image_tensor()
        guess = unit.mean(0, keepdim=True).expand_as(orig)
        row = {"config": "-", "attacker": "none (mean image)", "image_set": image_set, **image_scores(orig, guess)}
        row.update(self._semantic(image_set, guess, truth))
        return row

    def text_attack(self, attacker: str, image_set: str = "scenes") -> dict:
        """Token accuracy on the text-token rows of the image set's session."""
        capture, truth = self.capture(image_set)
        rows = A.wire_text_rows(capture, self.server)
        client = self.client(attacker)
        if attacker == "white":
            pred = A.nearest_tokens(rows, A.text_table(client))
        else:
            if attacker not in self._classifiers:
                self._classifiers[attacker] = A.train_text_classifier(client, self.s.text_steps, seed=self.s.seed)
            pred = A.classify_tokens(self._classifiers[attacker], rows)
        true = torch.cat(truth.text_tokens)
        return {"config": self.label, "attacker": attacker, "image_set": image_set,
                "text_token_acc": token_accuracy(pred, true), "text_rows": int(true.numel()),
                "text_chance": 1.0 / len(self.tok)}

    def label_attack(self, image_set: str = "scenes") -> dict:
        """Label bytes and label recovery in the paper cut and in the U-shaped cut."""
        out: dict = {"config": self.label}
        head = self.server.llm.get_output_embeddings().weight.detach()
        for cut in ("paper", "u"):
            capture, truth = self.capture(image_set, cut)
            obs = A.observe_labels(capture, head if cut == "u" else None)
            res = {"label_bytes": obs.label_bytes, "label_bytes_per_step": obs.label_bytes_per_step,
                   "steps": len(truth.labels)}
            if obs.labels_read:
                read = torch.cat([x.reshape(-1) for x in obs.labels_read])
                true = torch.cat([x.reshape(-1) for x in truth.labels])
                keep = true != -100
                res["labels_read_acc"] = token_accuracy(read[keep], true[keep])
                res["label_tokens"] = int(keep.sum())
            if obs.grad_norms:
                norms, guess, target = [], [], []
                for n, g, m, lab in zip(obs.grad_norms, obs.grad_guess, obs.predicting, truth.labels):
                    t = lab[:, 1:][m]
                    norms.append(n)
                    guess.append(g)
                    target.append(t)
                norms, guess, target = torch.cat(norms), torch.cat(guess), torch.cat(target)
                has = target != -100
                res["norm_auc"] = roc_auc(norms, has)  # which positions carry a label
                res["direction_acc"] = token_accuracy(guess[has], target[has])  # which token it is
                res["label_tokens"] = int(has.sum())
            out[cut] = res
        return out

    def run(self, attack: str, attacker: str, image_set: str = "scenes") -> dict:
        """One attack, as `qtllava attack` reports it."""
        t0 = time.perf_counter()
        if attack == "image":
            row, _, _ = self.image_attack(attacker, image_set)
        elif attack == "text":
            row = self.text_attack(attacker, image_set)
        elif attack == "labels":
            row = self.label_attack(image_set)
        else:
            raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
        row["checkpoint"] = str(self.checkpoint)
        row["wall_s"] = time.perf_counter() - t0
        return _finite(row)


def _finite(d):
    """JSON-safe: inf/nan floats become strings."""
    if isinstance(d, dict):
        return {k: _finite(v) for k, v in d.items()}
    if isinstance(d, float) and not math.isfinite(d):
        return str(d)
    return d

