"""Lightning's own DDP on two CPU processes (``strategy="ddp_find_unused_parameters_true"``,
gloo) with the callback, run by ``test_lightning.py``. Lightning starts rank 1 by running this
script again; rank 1 gets a schedule of its own, which the agreement must override."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pytorch_lightning as pl  # noqa: E402
from test_lightning import _Lit, _loader  # noqa: E402

from fxfreeze.integrations.lightning import FxFreezeCallback  # noqa: E402


def main(out: str) -> None:
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    schedule = {2: 2, 5: 5} if rank == 0 else {1: 6}
    cb = FxFreezeCallback(policy="manual", config={"manual": {"schedule": schedule}})
    lit = _Lit()
    trainer = pl.Trainer(
        max_steps=8, accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", logger=False,
        callbacks=[cb],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(lit, _loader())
    params = torch.cat([p.detach().flatten() for p in lit.parameters()])
    torch.save(params, Path(out) / f"params{rank}.pt")
    history = [(e["step"], e["num_frozen"], e["reason"]) for e in cb.module.freezer.history]
    (Path(out) / f"result{rank}.json").write_text(json.dumps({"world": trainer.world_size, "history": history}))


if __name__ == "__main__":
    main(sys.argv[1])
