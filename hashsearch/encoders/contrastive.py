"""Refine a latent layer H without labels: two views of one image should get one code.

`train --unsupervised --views V` starts from ITQ's H (encoders.unsupervised)
and trains H alone, the backbone frozen, on the F7 of V augmented views of
every image plus the image itself.  Each step draws two of an image's views
for each image in a batch and minimises NT-Xent (Chen et al., SimCLR, ICML
2020) over their codes: the pair should be nearer in Hamming distance than
the image is to any other image in the batch.  The codes are sign(H - 0.5)
in the forward pass and tanh's gradient in the backward one (straight-through),
so the loss sees the very codes the engine will search, as CIBHash's binary
layer does (Qiu et al., IJCAI 2021).  With the backbone frozen, every view's
F7 is computed once and an epoch costs a few seconds.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

# SimCLR works at 0.1-0.5; 0.3 is what the CIFAR-10 trial used (docs/results.md), not tuned.
TEMPERATURE = 0.3


def refine_latent(latent: nn.Linear, views: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
                  seed: int) -> list[dict]:
    """Train `latent` in place on F7 views [n, V + 1, D] (view 0 the image itself); one record per epoch.

    Each record holds the epoch's mean loss and `pair_loss`, the loss of a fixed pairing (view 0
    against view 1 of every image, in fixed batches), so that epochs, and the start (record 0,
    epoch 0), compare.
    """
    n = len(views)
    g = torch.Generator().manual_seed(seed)
    # tanh works on projections of unit spread, whatever the scale of F7 and of the ITQ start
    with torch.no_grad():
        scale = 1.0 / latent(views[:, 0].float()).std().clamp_min(1e-6)
    optimizer = torch.optim.AdamW(latent.parameters(), lr=lr, weight_decay=0.0)
    history = [{"epoch": 0, "loss": None, "pair_loss": _pair_loss(latent, views, scale, batch_size),
                "seconds": 0.0}]
    for epoch in range(epochs):
        started, total = time.perf_counter(), 0.0
        order = torch.randperm(n, generator=g)
        for a in range(0, n, batch_size):
            rows = order[a:a + batch_size]
            if len(rows) < 2:               # NT-Xent needs another image to push away from
                continue
            first, second = _two_views(views.shape[1], len(rows), g)
            loss = nt_xent(_codes(latent, views[rows, first], scale), _codes(latent, views[rows, second], scale))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        record = {"epoch": epoch + 1, "loss": total / n, "pair_loss": _pair_loss(latent, views, scale, batch_size),
                  "seconds": round(time.perf_counter() - started, 1)}
        history.append(record)
        tqdm.write(f"epoch {record['epoch']}/{epochs}  contrastive loss {record['loss']:.4f}  "
                   f"view pairs {record['pair_loss']:.4f}  ({record['seconds']}s)")
    return history


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """SimCLR's loss: row i of `a` and row i of `b` are a pair; every other row of either is a negative."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    m = len(a)
    partner = torch.cat([torch.arange(m, 2 * m), torch.arange(0, m)])
    return F.cross_entropy(similarity, partner)


def _codes(latent: nn.Linear, f7: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    soft = torch.tanh(latent(f7.float()) * scale)
    return soft + (torch.sign(soft) - soft).detach()


def _two_views(n_views: int, m: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two different view indices for each of m images."""
    first = torch.randint(0, n_views, (m,), generator=g)
    second = (first + torch.randint(1, n_views, (m,), generator=g)) % n_views
    return first, second


@torch.no_grad()
def _pair_loss(latent: nn.Linear, views: torch.Tensor, scale, batch_size: int) -> float:
    total, counted = 0.0, 0
    for a in range(0, len(views), batch_size):
        block = views[a:a + batch_size]
        if len(block) < 2:
            continue
        total += nt_xent(_codes(latent, block[:, 0], scale), _codes(latent, block[:, 1], scale)).item() * len(block)
        counted += len(block)
    return total / max(counted, 1)
