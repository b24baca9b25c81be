"""Training DSA (dsa.md §7): the memory-lean sparse backward (`ops.sparse_mla.sparse_attention`), the
indexer's KL loss, the paper's two stages (dense warm-up of the indexer, sparse training) on any
`ModelParams` of the package, a synthetic long-context task, and the shipped recall model.

Needs optax (`pip install 'dsa_hybrid[train]'`) for `train`; the rest runs without it."""

from __future__ import annotations

from dsa_hybrid.train.forward import LayerAux, forward_train, indexer_scores
from dsa_hybrid.train.loop import History, ProgressBar, indexer_mask, plot_history, stage_loss, train
from dsa_hybrid.train.losses import attention_target, indexer_kl_loss, lm_loss, selection_mask
from dsa_hybrid.train.tasks import RecallTask

__all__ = [
    "History",
    "LayerAux",
    "ProgressBar",
    "RecallTask",
    "attention_target",
    "forward_train",
    "indexer_kl_loss",
    "indexer_mask",
    "indexer_scores",
    "lm_loss",
    "plot_history",
    "selection_mask",
    "stage_loss",
    "train",
]
