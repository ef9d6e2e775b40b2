"""The sequence model trained on out-of-fold CNN outputs (`worker.model.stacking`)."""

from __future__ import annotations

import json

import numpy as np
import torch

from triage_node import CLASSES
from worker.model import metrics as M
from worker.model.networks import SequenceModel, SliceCNN
from worker.model.stacking import cnn_probs, load_out_of_fold, mirrored_logits, stacked_cv, study_scores

SLICES = 12


def _fake_run(root, n_patients=40, folds=4, seed=0, flip_fold=None):
    """A CV run whose CNN errs like ours: every series' first slice (the skull base) scores high."""
    rng = np.random.default_rng(seed)
    n = n_patients * SLICES
    labels = np.zeros((n, len(CLASSES)), np.uint8)
    probs = rng.uniform(0.01, 0.1, (n, len(CLASSES)))
    for i in range(n_patients):
        a = i * SLICES
        probs[a] = rng.uniform(0.8, 0.97)  # the artefact, bleed or not
        if i % 2 == 0:
            labels[a + 5 : a + 8, :2] = 1
            probs[a + 5 : a + 8, :2] = rng.uniform(0.4, 0.8, (3, 2))
    fold_of = [i % folds for i in range(n_patients)]
    if flip_fold is not None:
        for i in range(n_patients):
            if fold_of[i] == flip_fold:
                labels[i * SLICES : (i + 1) * SLICES] = 0
    cache = root / "cache"
    cache.mkdir(parents=True)
    np.save(cache / "inputs.npy", np.zeros((n, 3, 8, 8), np.float16))
    np.save(cache / "labels.npy", labels)
    keys = [f"ctich-{i}" for i in range(n_patients)]
    (cache / "series.json").write_text(json.dumps({"offsets": list(range(0, n + 1, SLICES)), "study_uids": keys,
                                                  "series_uids": keys, "patient_keys": keys}))
    (root / "cv").mkdir()
    for k in range(folds):
        test = [i for i in range(n_patients) if fold_of[i] == k]
        p = np.concatenate([probs[i * SLICES : (i + 1) * SLICES] for i in test])
        np.savez(root / "cv" / f"fold_{k}.npz", test=np.asarray(test), lengths=np.full(len(test), SLICES),
                 slice_seq=p, slice_cnn=p, cnn_loss=np.zeros(1), wall_s=np.asarray(1.0))
    return root


def test_a_sequence_model_on_out_of_fold_outputs_learns_where_the_cnn_errs(tmp_path):
    oof = load_out_of_fold(_fake_run(tmp_path))
    y, cnn, _ = study_scores(oof, cnn_probs(oof))
    _, stacked, _ = study_scores(oof, stacked_cv(oof, epochs=10, hidden=16, jitter=0.2))
    assert M.roc_auc(y[:, 0], cnn[:, 0]) < 0.75  # the maximum is mostly the artefact
    assert M.roc_auc(y[:, 0], stacked[:, 0]) > 0.95


def test_no_fold_is_scored_by_a_model_that_saw_its_labels(tmp_path):
    # Erasing fold 0's bleeds changes every other fold's model, never fold 0's own scores.
    a = load_out_of_fold(_fake_run(tmp_path / "a"))
    b = load_out_of_fold(_fake_run(tmp_path / "b", flip_fold=0))
    assert b.cache.labels.sum() < a.cache.labels.sum()
    pa, pb = stacked_cv(a, epochs=3, hidden=8), stacked_cv(b, epochs=3, hidden=8)
    for i in a.series(0, held_out=True):
        np.testing.assert_allclose(pa[i], pb[i], atol=1e-6)
    assert any(not np.allclose(pa[i], pb[i]) for i in a.series(1, held_out=True))


def test_mirrored_logits_average_each_folds_cnn_over_a_flip(tmp_path):
    run = _fake_run(tmp_path, n_patients=8, folds=2)
    torch.manual_seed(0)
    inputs = np.load(run / "cache" / "inputs.npy").astype(np.float32)
    inputs[:] = np.random.default_rng(1).uniform(0, 1, inputs.shape)
    np.save(run / "cache" / "inputs.npy", inputs.astype(np.float16))
    oof = load_out_of_fold(run)
    x = torch.from_numpy(np.asarray(oof.cache.inputs, dtype=np.float32))
    expect = np.zeros_like(oof.logits)
    for k in oof.folds:
        cnn = SliceCNN("resnet-lite").eval()
        (run / "cv" / f"fold_{k}").mkdir()
        torch.save({"config": {"backbone": "resnet-lite"}, "model": cnn.state_dict()}, run / "cv" / f"fold_{k}" / "cnn_last.pt")
        with torch.no_grad():
            for i in oof.series(k, held_out=True):
                s = oof.cache.series_slice(i)
                oof.logits[s] = cnn(x[s])[0].numpy()
                expect[s] = 0.5 * (oof.logits[s] + cnn(x[s].flip(-1))[0].numpy())
    np.testing.assert_allclose(mirrored_logits(run, oof), expect, atol=1e-4)
    assert not np.allclose(expect, oof.logits, atol=1e-3)  # the flip does change each CNN's answer


def test_a_probabilities_only_sequence_model_ignores_the_embedding():
    seq = SequenceModel(feature_dim=5, hidden=8, use_embedding=False).eval()
    x = torch.rand(1, 7, 5 + len(CLASSES))
    y = x.clone()
    y[..., :5] = torch.rand(1, 7, 5)
    with torch.no_grad():
        torch.testing.assert_close(seq(x), seq(y))


def test_cross_validation_and_the_shipped_model_use_the_out_of_fold_sequence_model(tmp_path):
    import onnxruntime as ort

    from triage_node.synth import write_dataset
    from worker.inference.card import load_model_card
    from worker.model.crossval import cross_validate
    from worker.model.train import TrainConfig, fit

    data = tmp_path / "synth"
    write_dataset(data, 8, 5, positive_fraction=0.5, rows=256, components=("axial",))
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(data), out=str(run), backbone="resnet-lite", size=32, epochs=1, batch_size=16,
                      seq_epochs=2, seed=0, seq_out_of_fold=True, cache_dir=str(run / "cache"))
    cross_validate(cfg, folds=2, n_boot=20)
    pooled = np.load(run / "cv" / "predictions.npz")
    own = np.concatenate([np.load(run / "cv" / f"fold_{k}.npz")["slice_seq"] for k in range(2)])
    assert pooled["slice_seq"].shape == own.shape and not np.allclose(pooled["slice_seq"], own)

    fit(TrainConfig(**{**cfg.__dict__, "val_fraction": 0.0, "ops_from": str(run / "cv" / "report.json")}))
    card = load_model_card(run / "triton")
    assert card.training["config"]["seq_out_of_fold"] is True
    # served with the usual [embedding, probabilities] input, it reads only the probabilities
    sess = ort.InferenceSession(str(run / "triton" / "models" / "ich_sequence" / "1" / "model.onnx"))
    x = np.random.default_rng(0).uniform(0, 1, (1, 5, card.embedding_dim + len(CLASSES))).astype(np.float32)
    y = x.copy()
    y[..., : card.embedding_dim] = 0
    np.testing.assert_allclose(sess.run(["logits"], {"sequence": x})[0], sess.run(["logits"], {"sequence": y})[0], atol=1e-5)
