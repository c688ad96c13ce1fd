"""A LightningModule trained with and without fxfreeze: the only change is
``callbacks=[FxFreezeCallback()]`` in the ``Trainer``; the LightningModule is untouched.

    .venv/bin/python examples/lightning.py                                   # scikit-learn digits (offline)
    .venv/bin/python examples/lightning.py --mnist ../shared/data/mnist10k   # MNIST idx files
    .venv/bin/python examples/lightning.py --policy freezeout --epochs 10

Both runs start from the same weights and see the same batches; each is timed after an
untimed warm-up fit of a few steps in the same process; validation is not timed.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F


def load(mnist: str | None, samples: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train x, train y, test x, test y), images as float tensors N x 1 x H x W."""
    from fxfreeze.data import load_mnist_idx, split_indices

    if mnist:
        x, y = load_mnist_idx(mnist)
        x = (x - 0.1307) / 0.3081
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
    tr, te = split_indices(len(x), 0.8, seed=1234)
    if samples:
        tr, te = tr[:samples], te[: max(64, samples // 4)]
    return x[tr], y[tr], x[te], y[te]


def make_module(lr: float, total_steps: int) -> Any:
    import pytorch_lightning as pl

    from fxfreeze import zoo

    class Classifier(pl.LightningModule):
        """A plain LightningModule: a CIFAR-style ResNet-20, SGD with a cosine schedule."""

        def __init__(self) -> None:
            super().__init__()
            self.net = zoo.resnet20(num_classes=10, in_channels=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss, prog_bar=False)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_acc", (self(x).argmax(1) == y).float().mean())

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Classifier()


def fit(module: Any, train: Any, callbacks: list[Any], *, epochs: int = 1, max_steps: int = -1) -> float:
    """One fit; returns its wall time."""
    import pytorch_lightning as pl

    trainer = pl.Trainer(
        max_epochs=epochs, max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
    )
    t0 = time.perf_counter()
    trainer.fit(module, train)
    return time.perf_counter() - t0


def accuracy(module: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    module.eval()
    with torch.no_grad():
        acc = (module(x).argmax(1) == y).float().mean().item()
    return 100.0 * acc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mnist", default=None, help="folder with MNIST idx files (default: scikit-learn digits)")
    ap.add_argument("--samples", type=int, default=0, help="training images to use (0 = all)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--policy", default=None, help="fxfreeze policy (default: fxfreeze's default)")
    ap.add_argument("--warmup-steps", type=int, default=3, help="untimed steps of each configuration first")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # the library's own chatter only

    from fxfreeze.integrations import comparison
    from fxfreeze.integrations.lightning import FxFreezeCallback

    xtr, ytr, xte, yte = load(args.mnist, args.samples or None)
    ds = torch.utils.data.TensorDataset(xtr, ytr)

    def loader() -> Any:
        return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))

    total = args.epochs * len(loader())
    torch.manual_seed(0)
    base = make_module(args.lr, total)
    kw = {} if args.policy is None else {"policy": args.policy}
    print(f"ResNet-20 on {len(xtr)} training / {len(xte)} test images ({'MNIST' if args.mnist else 'digits'}), "
          f"{args.epochs} epochs of {len(loader())} steps", flush=True)
    fit(copy.deepcopy(base), loader(), [], max_steps=args.warmup_steps)
    fit(copy.deepcopy(base), loader(), [FxFreezeCallback(**kw)], max_steps=args.warmup_steps)
    plain = copy.deepcopy(base)
    plain_s = fit(plain, loader(), [], epochs=args.epochs)
    frozen = copy.deepcopy(base)
    cb = FxFreezeCallback(**kw)
    frz_s = fit(frozen, loader(), [cb], epochs=args.epochs)
    note = (f"each timed after {args.warmup_steps} warm-up steps in this process; fxfreeze's time includes "
            f"{cb.lazy.compile_seconds:.1f} s capturing the model on its first call")
    plain_r, frozen_r = (plain_s, accuracy(plain, xte, yte)), (frz_s, accuracy(frozen, xte, yte))
    print("\n" + comparison(cb.module, "Lightning", plain_r, frozen_r, note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
