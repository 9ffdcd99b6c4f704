"""The DLBHC network (Lin et al., CVPRW 2015, Fig. 1).

    image -> backbone -> F7 (fine feature) -> H = sigmoid(W_H F7 + b)  (K latent bits)
                                            -> F8 = W_8 H + b           (class scores)

Trained with softmax cross-entropy on class labels; nothing pushes H to
0/1 explicitly, the classification loss alone makes it binary-like.  The
binary code is H > 0.5, and F7 is kept for the fine reranking step.
"""
from __future__ import annotations

import torch
from torch import nn


class HashNet(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, bits: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.latent = nn.Linear(feature_dim, bits)
        self.classifier = nn.Linear(bits, num_classes)

    def forward(self, images: torch.Tensor):
        """Returns (class logits, latent activations H in (0, 1), F7)."""
        f7 = self.backbone(images)
        h = torch.sigmoid(self.latent(f7))
        return self.classifier(h), h, f7

    def new_layers(self) -> list[nn.Parameter]:
        """The layers the paper adds on top of the backbone (trained at a higher rate)."""
        return [*self.latent.parameters(), *self.classifier.parameters()]
