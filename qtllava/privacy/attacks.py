"""The attacks. Each reads the wire only through a `Capture` (recorded serialized messages, parsed with the proto
classes and `Packet.from_bytes`) plus what the threat model grants the server: its own `ServerPart`, the announced
configuration, and a client part (the real one for the white-box attacker, a surrogate for the black-box one).

- image inversion: an `InversionNet` trained on the attacker's own images pushed through its client part and the
  compressor, applied to the image-token rows on the wire;
- text recovery: nearest neighbour of each text-token row on the wire among the embedding table pushed through the
  client part and the compressor (white-box), or a classifier trained on such rows (black-box);
- label exposure: label bytes in the messages; in the U-shaped cut, where labels stay on the client, the norm and
  direction of the hidden-state gradients the client returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qtllava.compress.grad import decode_grad
from qtllava.model.parts import ClientPart, ServerPart
from qtllava.privacy.nets import InversionConfig, InversionNet, fit, predict
from qtllava.privacy.wire import Capture, parse_steps
from qtllava.train.ucut import predicting_mask

__all__ = ["wire_image_rows", "wire_text_rows", "client_image_rows", "train_inverter", "invert", "Alignment",
           "fit_alignment",
           "text_table", "nearest_tokens", "TextClassifier", "train_text_classifier", "classify_tokens",
           "LabelObservation", "observe_labels"]


# --- what the wire carries ------------------------------------------------------------------------------------


@torch.no_grad()
def wire_image_rows(capture: Capture, server: ServerPart, num_tokens: int) -> torch.Tensor:
    """Image-token rows of every step request, dequantized by the server's codec -> (n_images, N, d_code)."""
    rows = [server.image_codec.dequantize(ws.image).float() for ws in parse_steps(capture) if ws.image is not None]
    rows = torch.cat(rows) if rows else torch.empty(0, 0)
    return rows.reshape(-1, num_tokens, rows.shape[-1])


@torch.no_grad()
def wire_text_rows(capture: Capture, server: ServerPart) -> torch.Tensor:
    """Text-token rows of every step request, dequantized -> (n_rows, d_code), in wire order."""
    rows = [server.text_codec.dequantize(ws.text).float() for ws in parse_steps(capture) if ws.text is not None]
    return torch.cat(rows) if rows else torch.empty(0, 0)


# --- image inversion -----------------------------------------------------------------------------------------


@torch.no_grad()
def client_image_rows(client: ClientPart, pixels: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """What `client` would put on the wire for these images: tower -> connector -> image codec -> dequantized
    values, encoded `chunk` images at a time (as in the victim's micro-batches) -> (n, N, d_code) float16."""
    client.eval()
    out = []
    for i in range(0, pixels.shape[0], chunk):
        feats = client.image_features(pixels[i:i + chunk])
        n, t, d = feats.shape
        values = client.image_codec(feats.reshape(n * t, d)).values
        out.append(values.reshape(n, t, -1).to(torch.float16))
    return torch.cat(out)


def train_inverter(rows: torch.Tensor, images: torch.Tensor, cfg: InversionConfig,
                   seed: int = 0) -> tuple[InversionNet, list[float]]:
    """Fit an `InversionNet` on the attacker's pairs: rows (n, N, d) -> images (n, 3, S, S) in [0, 1] (MSE)."""
    torch.manual_seed(seed)
    net = InversionNet(rows.shape[-1], rows.shape[1], images.shape[-1], cfg)
    history = fit(net, rows, F.mse_loss, images, cfg.steps, cfg.batch_size, cfg.lr, seed=seed)
    return net, history


@dataclass
class Alignment:
    """An affine map of wire rows into the surrogate's feature space: x -> (x - mu_wire[t]) @ m + mu_surrogate[t]
    (per-token means, one shared d x d matrix)."""

    mu_wire: torch.Tensor  # (N, d)
    mu_surrogate: torch.Tensor  # (N, d)
    m: torch.Tensor  # (d, d)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return ((rows.float() - self.mu_wire) @ self.m + self.mu_surrogate).to(rows.dtype)


def _sqrtm(c: torch.Tensor, inverse: bool) -> torch.Tensor:
    w, v = torch.linalg.eigh(c)
    w = w.clamp_min(1e-8)
    return (v * (w ** (-0.5 if inverse else 0.5))) @ v.T


@torch.no_grad()
def fit_alignment(wire: torch.Tensor, surrogate: torch.Tensor, shrink: float = 0.05) -> Alignment:
    """Black-box attacker: match the statistics of the wire rows it observed during training (wire, (n, N, d)) to
    those of its surrogate's rows on its own images of the same kind (surrogate, (m, N, d)): per-token means and a
    whitening-colouring of the pooled covariance (CORAL, Sun et al. 2016), each covariance shrunk towards its
    diagonal by `shrink`. Uses no label and no evaluation sample."""
    def stats(x):
        x = x.double()
        mu = x.mean(0)
        flat = (x - mu).reshape(-1, x.shape[-1])
        c = flat.T @ flat / max(1, flat.shape[0] - 1)
        c = (1 - shrink) * c + shrink * torch.diag(torch.diag(c)) + 1e-6 * torch.eye(c.shape[0], dtype=c.dtype)
        return mu, c

    mw, cw = stats(wire)
    ms, cs = stats(surrogate)
    m = _sqrtm(cw, inverse=True) @ _sqrtm(cs, inverse=False)
    return Alignment(mw.float(), ms.float(), m.float())


def invert(net: InversionNet, capture: Capture, server: ServerPart,
           align: Alignment | None = None) -> torch.Tensor:
    """Reconstruct every image of the capture -> (n_images, 3, S, S) in [0, 1] (rows aligned first if given)."""
    rows = wire_image_rows(capture, server, net.grid * net.grid)
    return predict(net, align(rows) if align is not None else rows)


# --- text recovery -------------------------------------------------------------------------------------------


@torch.no_grad()
def text_table(client: ClientPart, chunk: int = 256) -> torch.Tensor:
    """Every token id's embedding pushed through the client's text codec -> (V, d_code) dequantized values."""
    ids = torch.arange(client.vocab_size)
    return torch.cat([client.embed_text_rows(ids[i:i + chunk]).values.float()
                      for i in range(0, len(ids), chunk)])


@torch.no_grad()
def nearest_tokens(rows: torch.Tensor, table: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Index of the nearest table row (Euclidean) for each wire row -> (n,) token ids."""
    t2 = (table ** 2).sum(1)
    out = []
    for i in range(0, rows.shape[0], chunk):
        r = rows[i:i + chunk]
        d = t2[None, :] - 2 * r @ table.T
        out.append(d.argmin(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


class TextClassifier(nn.Module):
    def __init__(self, d_in: int, vocab: int, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, vocab))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_text_classifier(client: ClientPart, steps: int, noise: float = 0.3, batch_size: int = 256,
                          seed: int = 0) -> TextClassifier:
    """Black-box text attack: a classifier from wire rows to token ids, trained on the surrogate's embeddings
    jittered by Gaussian noise (`noise` x each row's std, so that it tolerates the real client's drift) and pushed
    through the surrogate's text codec."""
    gen = torch.Generator().manual_seed(seed)
    emb = client.embed_tokens.weight.detach()
    vocab = emb.shape[0]
    with torch.no_grad():
        d_code = client.embed_text_rows(torch.zeros(1, dtype=torch.long)).values.shape[-1]
    clf = TextClassifier(d_code, vocab)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    std = emb.std(dim=1, keepdim=True)
    for step in range(steps):
        ids = torch.randint(0, vocab, (batch_size,), generator=gen)
        with torch.no_grad():
            x = emb[ids] + noise * std[ids] * torch.randn(batch_size, emb.shape[1], generator=gen)
            x = client.text_codec(x).values.float()
        loss = F.cross_entropy(clf(x), ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clf.eval()
    return clf


@torch.no_grad()
def classify_tokens(clf: TextClassifier, rows: torch.Tensor) -> torch.Tensor:
    return predict(clf, rows, 1024).argmax(-1) if rows.shape[0] else torch.empty(0, dtype=torch.long)


# --- labels --------------------------------------------------------------------------------------------------


@dataclass
class LabelObservation:
    """What the server learns about labels from one capture."""

    label_bytes: int  # bytes the label fields take in all step requests
    label_bytes_per_step: float
    labels_read: list[torch.Tensor]  # per micro-batch (B, T) labels parsed from the wire (paper cut), else empty
    grad_norms: list[torch.Tensor]  # U cut: per micro-batch, norm of each predicting position's gradient
    grad_guess: list[torch.Tensor]  # U cut: per micro-batch, token guessed from the gradient's direction
    predicting: list[torch.Tensor]  # U cut: per micro-batch, (B, T-1) mask of the rows those belong to


@torch.no_grad()
def observe_labels(capture: Capture, head_weight: torch.Tensor | None) -> LabelObservation:
    """Label bytes on the wire, the labels themselves where they travel, and the gradient attack where they do not.

    Gradient attack (U cut): the client returns g = dL/dh for every position that predicts a text token; for the
    cross-entropy through the LM head W (V, D), g = (W^T (softmax(W h) - e_y)) / n, so positions without a label get
    g = 0 (norm attack) and the true token y is the one whose row W_y has the most negative inner product with g
    (direction attack). `head_weight` is the server's own copy of the LM head.
    """
    steps = parse_steps(capture)
    total = sum(ws.label_bytes for ws in steps)
    obs = LabelObservation(total, total / max(1, len(steps)), [], [], [], [])
    for ws in steps:
        if ws.labels is not None:
            obs.labels_read.append(ws.labels)
        if ws.hidden_grad is not None:
            g = decode_grad(ws.hidden_grad).float()
            obs.grad_norms.append(g.norm(dim=1))
            if head_weight is not None:
                obs.grad_guess.append((g @ head_weight.float().T).argmin(dim=1))
            obs.predicting.append(predicting_mask(ws.layout))
    return obs
