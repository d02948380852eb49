"""A plain small CNN: the "simple model first" of the course, fast on a CPU."""

from __future__ import annotations

from torch import nn

from cv_models.nets.registry import register_net


class SmallCNN(nn.Module):
    """``depth`` blocks of conv-BN-ReLU x2 + max-pool, doubling width, then global pooling and a linear head.

    ``features`` is the backbone and ``fc`` the head, so freezing and head replacement
    work as for torchvision's ResNets.
    """

    def __init__(self, num_classes: int, width: int = 32, depth: int = 3, dropout: float = 0.0, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(depth):
            c_out = width * 2**i
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.fc(self.dropout(self.features(x)))


@register_net("small_cnn")
def small_cnn(num_classes: int, width: int = 32, depth: int = 3, dropout: float = 0.0, **_) -> SmallCNN:
    return SmallCNN(num_classes, width=width, depth=depth, dropout=dropout)
