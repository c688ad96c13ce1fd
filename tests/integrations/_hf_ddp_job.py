"""One rank of the HF Trainer's own DDP (gloo, CPU) with the callback, launched by
``torchrun --standalone --nproc-per-node 2`` from ``test_hf_trainer.py``. Rank 1 is given a
schedule of its own, which the agreement must override: every rank applies rank 0's."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_hf_trainer import _model, _Tokens  # noqa: E402

from fxfreeze.integrations.transformers import FxFreezeCallback  # noqa: E402


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    schedule = {4: 1, 8: 2} if rank == 0 else {2: 3}
    cb = FxFreezeCallback(policy="manual", config={"manual": {"schedule": schedule}})
    model = _model()
    snap: dict[str, torch.Tensor] = {}
    grads: list[bool] = []

    class _Snapshot(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 8:  # the stem, frozen since step 4: no gradient (DDP writes none into it)
                snap.update({n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("transformer.wpe")})
                grads.extend(p.grad is None for n, p in model.named_parameters() if n in snap)

    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, max_steps=12, learning_rate=1e-3, report_to="none",
        use_cpu=True, disable_tqdm=True, seed=0, save_strategy="no", ddp_backend="gloo", weight_decay=0.1,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(96, 0), callbacks=[cb, _Snapshot()])
    trainer.train()
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save(params, Path(out) / f"params{rank}.pt")
    result = {
        "world": args.world_size,
        "history": [(e["step"], e["num_frozen"], e["reason"]) for e in cb.module.freezer.history],
        # AdamW with weight decay would have moved a frozen parameter given a zero gradient
        "stem_unchanged": all(torch.equal(p, snap[n]) for n, p in model.named_parameters() if n in snap) and bool(snap),
        "stem_grad_none": bool(grads) and all(grads),
        "frozen_at_end": cb.module.num_frozen,
    }
    (Path(out) / f"result{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
