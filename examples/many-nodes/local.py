"""Local training as every node of this example does it, with nothing Ferry-specific, so that
the Flower side of the comparison trains each virtual node with the very same steps."""

import torch


def local_sgd(module, images, labels, *, epochs, batch_size, lr, momentum, weight_decay, generator):
    """`epochs` epochs of SGD on the examples in batches shuffled by `generator`; returns the
    mean batch loss."""
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    module.train()
    losses = []
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(batch_size):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return sum(losses) / max(len(losses), 1)


def score(module, images, labels):
    """(loss, accuracy) of `module` on the examples."""
    module.eval()
    with torch.no_grad():
        logits = module(images)
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()
