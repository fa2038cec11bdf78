"""LeNet-5 for 28x28 grey images: two 5x5 convolutions with max pooling and three linear
layers (44,426 parameters, no BatchNorm), the network of this example and of the Flower side
of its comparison (`benchmarks/peers/flower/own_code_round.py`)."""

import torch
from torch import nn


class LeNet(nn.Module):
    """LeNet-5 with ReLU, for 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(torch.relu(self.fc2(x)))
