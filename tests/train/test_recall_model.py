"""The shipped recall model (`python/dsa_hybrid/train/weights/recall`, `dsa-hybrid train --recipe
recall`) loads and reaches the accuracy docs/training.md reports, on a fixed evaluation set."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dsa_hybrid.train.recipes import RECALL_TASK, WEIGHTS_DIR, evaluate_recall, load_model, save_model

pytestmark = pytest.mark.skipif(
    not (WEIGHTS_DIR / "recall" / "model.safetensors").is_file(), reason="the recall weights are not shipped"
)


def test_the_shipped_weights_reach_the_documented_accuracy() -> None:
    params, cfg, task = load_model()
    assert task == RECALL_TASK and cfg.vocab_size == task.vocab_size
    # 8 sequences × 8 questions at L = 256 (another set than docs/training.md's table, where dense and DSA
    # at L/16 both reach 0.945 and random / window k 0.16 / 0.23).
    (row,) = evaluate_recall(params, cfg, task, (256,), (16,), sequences=8, batch=8, seed=77)
    k = 256 // 16
    assert row.dense >= 0.85, row
    assert row.dsa[k] >= row.dense - 0.05, row
    assert row.random[k] <= 0.45 and row.window[k] <= 0.45, row
    assert row.mass[k] > 3 * k / 256, row  # far above what k positions of a flat attention hold


def test_save_and_load_round_trip(tmp_path) -> None:
    params, cfg, task = load_model()
    save_model(params, cfg, tmp_path, task)
    again, cfg2, task2 = load_model(tmp_path)
    assert cfg2 == cfg and task2 == task
    np.testing.assert_array_equal(np.asarray(again.blocks[1].attn.idx_wq_b), np.asarray(params.blocks[1].attn.idx_wq_b))
    assert json.loads((tmp_path / "task.json").read_text())["pairs"] == task.pairs
