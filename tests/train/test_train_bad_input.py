"""`dsa_hybrid.train`'s bad-input catalogue (issue 16): `forward_train`, `indexer_scores`, the losses,
`stage_loss`, `train`, `History`, `ProgressBar`, `plot_history`, `RecallTask`, the recall recipe
(`RecallRecipe`, `train_recall`, `save_model`, `load_model`, `evaluate_recall`, `run_recall_recipe`) and
the `dsa-hybrid train` flags.

Each bad case states its exception and a fragment of the message naming the argument; after every case
the inputs are intact (the model's arrays, the tokens, the task files). Every refusal happens before any
work: no case compiles a training step. Good cases check what the functions compute on a tiny model."""

# ruff: noqa: E501 - one catalogue case per line

from __future__ import annotations

import io
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_hybrid import DSAConfig, cli
from dsa_hybrid.models.causal_lm import ModelParams
from dsa_hybrid.train import (
    History,
    ProgressBar,
    RecallTask,
    attention_target,
    forward_train,
    indexer_kl_loss,
    indexer_mask,
    indexer_scores,
    lm_loss,
    plot_history,
    selection_mask,
    stage_loss,
    train,
)
from dsa_hybrid.train.recipes import (
    RECALL_TASK,
    WEIGHTS_DIR,
    RecallRecipe,
    evaluate_recall,
    format_table,
    load_model,
    run_recall_recipe,
    save_model,
    train_recall,
)

CFG = DSAConfig.tiny().replace(n_routed_experts=0, index_topk=8, vocab_size=64, num_hidden_layers=1)
PARAMS = ModelParams.random(CFG, seed=3)
L = 12
TOK = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, L)), jnp.int32)
TGT = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, L)), jnp.int32)
WTS = jnp.ones((2, L), jnp.float32)
BATCH = (TOK, TGT, WTS)
NP_BATCH = tuple(np.asarray(a) for a in BATCH)
RNG = np.random.default_rng(0)
QI = jnp.asarray(RNG.normal(size=(3, 2, 8)), jnp.float32)
WI = jnp.asarray(RNG.random((3, 2)), jnp.float32)
KI = jnp.asarray(RNG.normal(size=(5, 8)), jnp.float32)
QPOS = jnp.asarray([0, 2, 4], jnp.int32)
P = jax.nn.softmax(jnp.asarray(RNG.normal(size=(3, 5)), jnp.float32), -1)
S = jnp.asarray(RNG.normal(size=(3, 5)), jnp.float32)
SEL = jnp.asarray([[0, 1], [2, -1], [4, 3]], jnp.int32)
HIST = History("dense", steps=[1, 2], losses={"lm": [2.0, 1.0]}, seconds=[0.1, 0.2])
TASK = RecallTask()
WIDE = DSAConfig.tiny().replace(n_routed_experts=0, vocab_size=64, num_hidden_layers=2, first_k_dense_replace=2)


def batches_of(*batch: Any) -> Callable[[int], Any]:
    return lambda _i: batch


def leaves(x: Any) -> list[np.ndarray]:
    return [np.array(a) for a in jax.tree_util.tree_leaves(x)]


PARAMS_BEFORE = leaves(PARAMS)
BATCH_BEFORE = leaves(BATCH)

# (id, call, exception, message fragment)
Case = tuple[str, Callable[[], Any], type[BaseException], str]
# fmt: off
CASES: list[Case] = [
    # forward_train
    ("forward/params-none", lambda: forward_train(None, CFG, TOK), TypeError, "params: expected ModelParams"),
    ("forward/cfg-dict", lambda: forward_train(PARAMS, {}, TOK), TypeError, "cfg: expected a DSAConfig"),
    ("forward/tokens-list", lambda: forward_train(PARAMS, CFG, [[1, 2]]), TypeError, "tokens: expected an array"),
    ("forward/tokens-1d", lambda: forward_train(PARAMS, CFG, TOK[0]), ValueError, "tokens: expected integers of shape [B, L]"),
    ("forward/tokens-float", lambda: forward_train(PARAMS, CFG, TOK.astype(jnp.float32)), ValueError, "tokens:"),
    ("forward/tokens-empty", lambda: forward_train(PARAMS, CFG, TOK[:, :0]), ValueError, "tokens: expected at least one"),
    ("forward/tokens-vocab", lambda: forward_train(PARAMS, CFG, TOK.at[0, 0].set(64)), ValueError, "tokens: ids must lie in [0, 64)"),
    ("forward/tokens-negative", lambda: forward_train(PARAMS, CFG, TOK.at[0, 0].set(-1)), ValueError, "tokens: ids"),
    ("forward/mode", lambda: forward_train(PARAMS, CFG, TOK, mode="full"), ValueError, "mode: expected one of"),
    ("forward/k-0", lambda: forward_train(PARAMS, CFG, TOK, mode="sparse", k=0), ValueError, "k: must be >= 1"),
    ("forward/k-float", lambda: forward_train(PARAMS, CFG, TOK, mode="sparse", k=2.0), TypeError, "k: expected an integer"),
    ("forward/k-bool", lambda: forward_train(PARAMS, CFG, TOK, mode="sparse", k=True), TypeError, "k:"),
    ("forward/query_block-0", lambda: forward_train(PARAMS, CFG, TOK, query_block=0), ValueError, "query_block: must be >= 1"),
    ("forward/aux_rows-float", lambda: forward_train(PARAMS, CFG, TOK, aux_rows=jnp.ones(2)), ValueError, "aux_rows: expected integers"),
    ("forward/aux_rows-2d", lambda: forward_train(PARAMS, CFG, TOK, aux_rows=jnp.ones((1, 2), jnp.int32)), ValueError, "aux_rows: expected 1 dimensions"),
    ("forward/aux_rows-past", lambda: forward_train(PARAMS, CFG, TOK, aux_rows=jnp.asarray([0, L], jnp.int32)), IndexError, f"aux_rows: positions must lie in [0, {L})"),
    ("forward/aux_rows-neg", lambda: forward_train(PARAMS, CFG, TOK, aux_rows=[-1]), IndexError, "aux_rows:"),
    ("forward/blocks", lambda: forward_train(PARAMS, WIDE, TOK), ValueError, "params: 1 blocks for a config of 2 layers"),
    # indexer_scores
    ("scores/q-list", lambda: indexer_scores([[1.0]], WI, KI, QPOS), TypeError, "q_idx: expected an array"),
    ("scores/q-2d", lambda: indexer_scores(QI[0], WI, KI, QPOS), ValueError, "q_idx: expected [R, H_I, D_I]"),
    ("scores/w-shape", lambda: indexer_scores(QI, WI[:, :1], KI, QPOS), ValueError, "w_idx: expected [3, 2]"),
    ("scores/k-width", lambda: indexer_scores(QI, WI, KI[:, :4], QPOS), ValueError, "k_idx: expected [L, 8]"),
    ("scores/pos-float", lambda: indexer_scores(QI, WI, KI, QPOS.astype(jnp.float32)), ValueError, "q_pos: expected integers"),
    ("scores/pos-rows", lambda: indexer_scores(QI, WI, KI, QPOS[:2]), ValueError, "q_pos: expected [3]"),
    # attention_target, indexer_kl_loss, selection_mask, lm_loss
    ("target/2d", lambda: attention_target(P), ValueError, "attn_probs: expected [T, h, L]"),
    ("target/list", lambda: attention_target([[[1.0]]]), TypeError, "attn_probs: expected an array"),
    ("kl/shapes", lambda: indexer_kl_loss(P, S[:, :4]), ValueError, "target, scores: expected two [T, L] arrays"),
    ("kl/unnormalised-2d", lambda: indexer_kl_loss(P, S, normalised=False), ValueError, "target: expected attention probabilities"),
    ("kl/target-none", lambda: indexer_kl_loss(None, S), TypeError, "target: expected an array"),
    ("kl/scores-list", lambda: indexer_kl_loss(P, S.tolist()), TypeError, "scores: expected an array"),
    ("kl/selected-float", lambda: indexer_kl_loss(P, S, SEL.astype(jnp.float32)), ValueError, "selected: expected integers"),
    ("kl/selected-rows", lambda: indexer_kl_loss(P, S, SEL[:2]), ValueError, "selected: expected [3, K]"),
    ("kl/selected-1d", lambda: indexer_kl_loss(P, S, SEL[0]), ValueError, "selected: expected 2 dimensions"),
    ("mask/1d", lambda: selection_mask(SEL[0], 5), ValueError, "selected: expected 2 dimensions"),
    ("mask/length-neg", lambda: selection_mask(SEL, -1), ValueError, "length: must be >= 0"),
    ("mask/length-float", lambda: selection_mask(SEL, 5.0), TypeError, "length: expected an integer"),
    ("lm/scalar", lambda: lm_loss(jnp.float32(1.0), jnp.int32(0)), ValueError, "logits: expected [..., V]"),
    ("lm/targets-shape", lambda: lm_loss(jnp.zeros((2, L, 64)), TGT[:, :3]), ValueError, f"targets: expected [2, {L}]"),
    ("lm/targets-float", lambda: lm_loss(jnp.zeros((2, L, 64)), TGT.astype(jnp.float32)), ValueError, "targets: expected integers"),
    ("lm/targets-vocab", lambda: lm_loss(jnp.zeros((2, L, 64)), TGT.at[0, 0].set(64)), ValueError, "targets: ids must lie in [0, 64)"),
    ("lm/weights-shape", lambda: lm_loss(jnp.zeros((2, L, 64)), TGT, WTS[0]), ValueError, f"weights: expected [2, {L}]"),
    ("lm/logits-list", lambda: lm_loss([[0.0]], TGT), TypeError, "logits: expected an array"),
    # stage_loss, indexer_mask
    ("stage_loss/stage", lambda: stage_loss(PARAMS, CFG, BATCH, "pretrain", 4), ValueError, "stage: expected one of"),
    ("stage_loss/batch", lambda: stage_loss(PARAMS, CFG, BATCH[:2], "dense", 4), ValueError, "batch: expected (tokens, targets, weights)"),
    ("stage_loss/k", lambda: stage_loss(PARAMS, CFG, BATCH, "sparse", 0), ValueError, "k: must be >= 1"),
    ("indexer_mask/none", lambda: indexer_mask(None), TypeError, "params: expected ModelParams"),
    # train: every argument before the first step
    ("train/params", lambda: train({}, CFG, batches_of(*NP_BATCH), stage="dense", steps=1), TypeError, "params: expected ModelParams"),
    ("train/cfg", lambda: train(PARAMS, "tiny", batches_of(*NP_BATCH), stage="dense", steps=1), TypeError, "cfg: expected a DSAConfig"),
    ("train/stage", lambda: train(PARAMS, CFG, batches_of(*NP_BATCH), stage="finetune", steps=1), ValueError, "stage: expected one of"),
    ("train/steps-0", lambda: train(PARAMS, CFG, batches_of(*NP_BATCH), stage="dense", steps=0), ValueError, "steps: must be >= 1"),
    ("train/steps-float", lambda: train(PARAMS, CFG, batches_of(*NP_BATCH), stage="dense", steps=1.5), TypeError, "steps: expected an integer"),
    ("train/lr-nan", lambda: train(PARAMS, CFG, batches_of(*NP_BATCH), stage="dense", steps=1, learning_rate=math.nan), ValueError, "learning_rate: must be finite"),
    ("train/lr-0", lambda: train(PARAMS, CFG, batches_of(*NP_BATCH), stage="dense", steps=1, learning_rate=0.0), ValueError, "learning_rate: must be > 0.0"),
    ("train/lr-str", lambda: train(PARAMS, CFG, batches_of(*NP_BATCH), stage="dense", steps=1, learning_rate="1e-3"), TypeError, "learning_rate: expected a real number"),
    ("train/k-0", lambda: train(PARAMS, CFG, batches_of(*NP_BATCH), stage="sparse", steps=1, k=0), ValueError, "k: must be >= 1"),
    ("train/log_every-0", lambda: train(PARAMS, CFG, batches_of(*NP_BATCH), stage="dense", steps=1, log_every=0), ValueError, "log_every: must be >= 1"),
    ("train/batches-int", lambda: train(PARAMS, CFG, 5, stage="dense", steps=1), TypeError, "batches: expected an iterator or a function"),
    ("train/batch-pair", lambda: train(PARAMS, CFG, batches_of(*NP_BATCH[:2]), stage="dense", steps=1, progress=False), ValueError, "batches[0]: expected (tokens, targets, weights)"),
    ("train/batch-1d", lambda: train(PARAMS, CFG, batches_of(NP_BATCH[0][0], NP_BATCH[1][0], NP_BATCH[2][0]), stage="dense", steps=1, progress=False), ValueError, "batches[0]: tokens: expected [B, L]"),
    ("train/batch-targets-shape", lambda: train(PARAMS, CFG, batches_of(NP_BATCH[0], NP_BATCH[1][:, :3], NP_BATCH[2]), stage="dense", steps=1, progress=False), ValueError, "batches[0]: targets: expected"),
    ("train/batch-vocab", lambda: train(PARAMS, CFG, batches_of(NP_BATCH[0] + 64, NP_BATCH[1], NP_BATCH[2]), stage="dense", steps=1, progress=False), ValueError, "batches[0]: tokens: ids must lie in [0, 64)"),
    ("train/batch-float-tokens", lambda: train(PARAMS, CFG, batches_of(NP_BATCH[0] * 1.0, NP_BATCH[1], NP_BATCH[2]), stage="dense", steps=1, progress=False), ValueError, "batches[0]: tokens: expected integers"),
    ("train/batch-nan-weights", lambda: train(PARAMS, CFG, batches_of(NP_BATCH[0], NP_BATCH[1], NP_BATCH[2] * np.nan), stage="dense", steps=1, progress=False), ValueError, "batches[0]: weights: must be finite"),
    ("train/batch-ragged", lambda: train(PARAMS, CFG, batches_of([[1, 2], [3]], NP_BATCH[1], NP_BATCH[2]), stage="dense", steps=1, progress=False), ValueError, "batches[0]: not arrays"),
    # History, ProgressBar, plot_history
    ("history/last-unknown", lambda: HIST.last("kl"), KeyError, "no loss 'kl' logged"),
    ("history/last-n0", lambda: HIST.last("lm", 0), ValueError, "n: must be >= 1"),
    ("progress/total-neg", lambda: ProgressBar(-1, "x"), ValueError, "total: must be >= 0"),
    ("progress/label", lambda: ProgressBar(3, 7), TypeError, "label: expected a str"),
    ("progress/stream", lambda: ProgressBar(3, "x", stream=5), TypeError, "stream: expected a text stream"),
    ("plot/empty", lambda: plot_history([], "x.png"), ValueError, "histories: expected a non-empty list"),
    ("plot/not-history", lambda: plot_history([{"lm": [1.0]}], "x.png"), TypeError, "histories[0]: expected a History"),
    ("plot/no-dir", lambda: plot_history([HIST], "/no/such/dir/x.png"), FileNotFoundError, "path: no such directory"),
    ("plot/path-int", lambda: plot_history([HIST], 3), TypeError, "path: expected a path"),
    # RecallTask
    ("task/n_keys-0", lambda: RecallTask(n_keys=0), ValueError, "RecallTask.n_keys: must be >= 1"),
    ("task/n_keys-float", lambda: RecallTask(n_keys=8.5), TypeError, "RecallTask.n_keys: expected an integer"),
    ("task/pairs-bool", lambda: RecallTask(pairs=True), TypeError, "RecallTask.pairs"),
    ("task/pairs-over", lambda: RecallTask(n_keys=4, pairs=8), ValueError, "need queries (4) <= pairs (8) <= n_keys (4)"),
    ("task/vocab-huge", lambda: RecallTask(n_keys=10**6, n_values=10**6), ValueError, "would pass 2147483647"),
    ("task/batch-rng", lambda: TASK.batch(0, 2, 32), TypeError, "rng: expected a numpy Generator"),
    ("task/batch-0", lambda: TASK.batch(np.random.default_rng(0), 0, 32), ValueError, "batch: must be >= 1"),
    ("task/batch-short", lambda: TASK.batch(np.random.default_rng(0), 2, 16), ValueError, "length: must be >= 17"),
    ("task/batch-huge", lambda: TASK.batch(np.random.default_rng(0), 2**20, 2**20), MemoryError, "batch x length"),
    ("task/ask-short", lambda: TASK.ask_positions(3), ValueError, "length: must be >= 17"),
    ("task/prompts-0", lambda: TASK.prompts(np.random.default_rng(0), 0, 32), ValueError, "n: must be >= 1"),
    ("task/prompts-short", lambda: TASK.prompts(np.random.default_rng(0), 2, 5), ValueError, "length: must be >= 10"),
    # the recall recipe
    ("recipe/batch-0", lambda: RecallRecipe(batch=0), ValueError, "RecallRecipe.batch: must be >= 1"),
    ("recipe/lengths-empty", lambda: RecallRecipe(lengths=()), ValueError, "RecallRecipe.lengths: expected a non-empty tuple"),
    ("recipe/lengths-short", lambda: RecallRecipe(lengths=(4,)), ValueError, "RecallRecipe.lengths[0]: must be >= 25"),
    ("recipe/lengths-list", lambda: RecallRecipe(lengths=[64]), ValueError, "RecallRecipe.lengths"),
    ("recipe/steps-neg", lambda: RecallRecipe(dense_steps=-1), ValueError, "RecallRecipe.dense_steps: must be >= 0"),
    ("recipe/lr-nan", lambda: RecallRecipe(dense_lr=math.nan), ValueError, "RecallRecipe.dense_lr: must be finite"),
    ("recipe/seed-float", lambda: RecallRecipe(seed=1.5), TypeError, "RecallRecipe.seed: expected an integer"),
    ("recipe/sparse_k-0", lambda: RecallRecipe(sparse_k=0), ValueError, "RecallRecipe.sparse_k"),
    ("train_recall/recipe", lambda: train_recall({"batch": 2}), TypeError, "recipe: expected a RecallRecipe"),
    ("load_model/missing", lambda: load_model("/no/such/model"), FileNotFoundError, "holds no config.json"),
    ("evaluate/lengths-empty", lambda: evaluate_recall(PARAMS, CFG, TASK, ()), ValueError, "lengths, fractions"),
    ("evaluate/length-short", lambda: evaluate_recall(PARAMS, CFG, TASK, (8,)), ValueError, "lengths[0]: must be >= 17"),
    ("evaluate/fraction-0", lambda: evaluate_recall(PARAMS, CFG, TASK, (32,), (0,)), ValueError, "fractions[0]: must be >= 1"),
    ("evaluate/sequences-0", lambda: evaluate_recall(PARAMS, CFG, TASK, (32,), sequences=0), ValueError, "sequences: must be >= 1"),
    ("run_recipe/out-parent", lambda: run_recall_recipe("/no/such/dir/model", RecallRecipe()), FileNotFoundError, "out_dir: no such parent directory"),
    ("run_recipe/recipe", lambda: run_recall_recipe("model_out", None), TypeError, "recipe: expected a RecallRecipe"),
    ("run_recipe/lengths", lambda: run_recall_recipe("model_out", RecallRecipe(), lengths=(4,)), ValueError, "lengths[0]: must be >= 25"),
]
# fmt: on


@pytest.mark.parametrize(("call", "exc", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_by_name_and_changes_nothing(
    call: Callable[[], Any], exc: type[BaseException], match: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a case that wrongly went ahead would write here, not in the checkout
    with pytest.raises(exc) as info:
        call()
    assert match in str(info.value), str(info.value)
    for before, after in zip(PARAMS_BEFORE, leaves(PARAMS), strict=True):
        np.testing.assert_array_equal(before, after)
    for before, after in zip(BATCH_BEFORE, leaves(BATCH), strict=True):
        np.testing.assert_array_equal(before, after)
    assert list(tmp_path.iterdir()) == []  # nothing written (no model directory, no plot)
    assert HIST.losses == {"lm": [2.0, 1.0]}


def test_run_recall_recipe_refuses_a_file_as_out_dir(tmp_path: Path) -> None:
    f = tmp_path / "model"
    f.write_text("keep me")
    with pytest.raises(FileExistsError, match="out_dir: .* is a file"):
        run_recall_recipe(f, RecallRecipe())
    assert f.read_text() == "keep me"


def test_save_model_into_a_file_is_an_os_error_and_keeps_the_file(tmp_path: Path) -> None:
    f = tmp_path / "model"
    f.write_text("keep me")
    with pytest.raises(FileExistsError):
        save_model(PARAMS, CFG, f)
    assert f.read_text() == "keep me"


@pytest.fixture(scope="module")
def shipped_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped recall model's config (no weights: every task.json case fails before they are read)."""
    d = tmp_path_factory.mktemp("recall")
    shutil.copy(WEIGHTS_DIR / "recall" / "config.json", d / "config.json")
    return d


# (id, task.json bytes, fragment)
TASK_FILES: list[tuple[str, bytes, str]] = [
    ("not-json", b"{n_keys: 8", "not valid JSON"),
    ("not-utf8", b'{"n_keys": "\xff"}', "not valid JSON"),
    ("a-list", b"[8, 8]", "expected an object with fields of"),
    ("unknown-field", b'{"n_keys": 8, "evil": 1}', "expected an object with fields of"),
    ("negative", b'{"n_keys": -1}', "RecallTask.n_keys: must be >= 1"),
    ("string-size", b'{"n_keys": "8"}', "RecallTask.n_keys: expected an integer"),
    (
        "vocab-over-model",
        b'{"n_keys": 64, "n_values": 64, "pairs": 8, "queries": 8}',
        "the task needs 4290 tokens, the model has 114",
    ),
]


@pytest.mark.parametrize(("content", "match"), [c[1:] for c in TASK_FILES], ids=[c[0] for c in TASK_FILES])
def test_load_model_refuses_a_hostile_task_json(shipped_copy: Path, content: bytes, match: str) -> None:
    (shipped_copy / "task.json").write_bytes(content)
    with pytest.raises(ValueError, match="task.json") as info:
        load_model(shipped_copy)
    assert match in str(info.value), str(info.value)


# `dsa-hybrid train` flags: usage errors (one line on stderr, exit status 2) before anything is trained.
USAGE: list[tuple[list[str], str]] = [
    (["--dense-steps", "-1"], "--dense-steps: must lie in [0, 10000000], got -1"),
    (["--warmup-steps", "1e3"], "--warmup-steps: expected an integer, got '1e3'"),
    (["--sparse-steps", "99999999999"], "--sparse-steps: must lie in"),
    (["--seed", "-1"], "--seed: must lie in [0, 4294967295]"),
    (["--eval-lengths", "a,b"], "--eval-lengths: expected comma-separated integers"),
    (["--eval-lengths", ","], "--eval-lengths: expected at least one length"),
    (["--eval-lengths", "128,4"], "--eval-lengths: each length must lie in [25, 131072], got 4"),
    (["--eval-lengths", "999999999"], "--eval-lengths: each length must lie in"),
    (["--out", "/no/such/dir/model"], "--out: cannot write into"),
    (["--recipe", "gpt"], "--recipe: invalid choice"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize(("argv", "match"), USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_train_flags_are_usage_errors(argv: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["train", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsa-hybrid") and match in err[0], err


def test_train_out_that_is_a_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--out", str(f)])
    assert info.value.code == 2 and "--out: cannot write into" in capsys.readouterr().err


# ----- good cases: the same entry points, accepted, compute what they say ------------------------------
def test_good_inputs_compute_what_they_say() -> None:
    # indexer_scores: -inf exactly past each query's position; finite, >= 0 ReLU-weighted sums before.
    s = np.asarray(indexer_scores(QI, WI, KI, QPOS))
    assert s.shape == (3, 5)
    for r, p in enumerate([0, 2, 4]):
        assert np.isneginf(s[r, p + 1 :]).all() and np.isfinite(s[r, : p + 1]).all() and (s[r, : p + 1] >= 0).all()
    # losses: KL of a distribution with itself is 0; uniform logits give ln(V); the mask names SEL.
    assert abs(float(indexer_kl_loss(P, jnp.log(P)))) < 1e-5
    assert float(indexer_kl_loss(P, S)) > 0
    assert abs(float(lm_loss(jnp.zeros((2, L, 64)), TGT, WTS)) - math.log(64)) < 1e-5
    m = np.asarray(selection_mask(SEL, 5))
    assert m.sum() == 5 and m[0, :2].all() and m[1, 2] and m[2, 3:].all()
    assert np.allclose(np.asarray(attention_target(jnp.ones((2, 3, 4)))).sum(-1), 1.0)
    # forward_train accepts a list of aux rows and reports exactly those rows (shapes only: eval_shape; the
    # values are tests/train/test_train_forward.py's).
    logits, aux = jax.eval_shape(lambda t: forward_train(PARAMS, CFG, t, mode="window", k=3, aux_rows=[L - 1]), TOK)
    assert logits.shape == (2, L, 64) and aux[0].selected is not None and aux[0].selected.shape == (2, 1, 3)
    # the task, the history, the progress bar, the table
    tokens, targets, weights = TASK.batch(np.random.default_rng(0), 2, 32)
    assert tokens.shape == (2, 32) and tokens.max() < TASK.vocab_size and weights.sum() == 2 * TASK.queries
    assert TASK.ask_positions(32).tolist() == [24, 26, 28, 30]
    assert HIST.last("lm") == 1.0 and HIST.last("lm", 2) == 1.5
    out = io.StringIO()
    bar = ProgressBar(2, "x", stream=out)
    bar.update(2, "done")
    assert "2/2" in out.getvalue()
    assert format_table([]).count("\n") == 1
    assert RecallRecipe().lengths == (64, 128) and indexer_mask(PARAMS).blocks[0].attn.idx_wq_b is True
    assert RECALL_TASK.min_length() == 25
    assert json.loads(json.dumps(RecallRecipe().lengths)) == [64, 128]
