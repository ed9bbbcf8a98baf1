"""Accuracy and memory of training with bf16 parameters: plain, fp32 master weights, stochastic rounding.

A short real run on scikit-learn's handwritten digits (8x8, no download): a 64-256-256-10 MLP (a
CIFAR ResNet in bf16 takes minutes per epoch on a 2-core CPU; run --model resnet20 on a GPU), SGD
with momentum and a small lr, the whole model in bf16 except where an option keeps fp32 masters.
Reports test accuracy (mean and spread over seeds), final training loss and the optimizer state's
bytes per param.

    .venv/bin/python benchmarks/bench_low_precision.py [--epochs 10] [--seeds 2] [--model mlp|resnet20]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import resfast
from resfast.nn.cifar import resnet20

RUNS = {
    "fp32 params": (torch.float32, {}),
    "bf16 params": (torch.bfloat16, {}),
    "bf16 + fp32 master weights": (torch.bfloat16, {"master_weights": True}),
    "bf16 + stochastic rounding": (torch.bfloat16, {"bf16_stochastic_rounding": True}),
}


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1) / 16.0  # N,3,8,8
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


def _model(name: str) -> torch.nn.Module:
    if name == "resnet20":
        return resnet20(num_classes=10)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(3 * 64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
        torch.nn.ReLU(), torch.nn.Linear(256, 10),
    )  # fmt: skip


def _run(model_name: str, dtype: torch.dtype, options: dict, seed: int, epochs: int, data):
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = _model(model_name).to(dtype)
    params = list(model.parameters())
    # A small lr is where bf16 rounding swallows updates (bf16 keeps 8 significant bits).
    opt = resfast.optim.SGD(params, lr=0.003, momentum=0.9, **options)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y_train)).split(64):
            loss = F.cross_entropy(model(x_train[batch].to(dtype)).float(), y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test.to(dtype)).argmax(1) == y_test).float().mean().item()
    state_bytes = sum(t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    return accuracy, loss.item(), state_bytes / sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per run")
    parser.add_argument("--model", choices=["mlp", "resnet20"], default="mlp", help="network to train")
    parser.add_argument("--seeds", type=int, default=2, help="runs per configuration")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = _data()
    print(f"{args.model} on digits, SGD momentum lr 0.003, {args.epochs} epochs, {args.seeds} seeds")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'configuration':<30} {'test acc (mean ± sd)':>22} {'final loss':>11} {'state bytes/param':>18}")
    for name, (dtype, options) in RUNS.items():
        results = [_run(args.model, dtype, options, seed, args.epochs, data) for seed in range(args.seeds)]
        accs = [100 * r[0] for r in results]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(
            f"{name:<30} {statistics.mean(accs):>13.2f} ± {spread:<6.2f} "
            f"{statistics.mean(r[1] for r in results):>11.4f} {results[0][2]:>18.1f}"
        )


if __name__ == "__main__":
    main()
