"""VOC07 SVM and low-shot SVM: AP by hand, the difficult-image rules, CV cost choice, low-shot sampling, the
batched torch solver against sklearn's LinearSVC (the reference), and both evaluators end to end on the
embedded demo data from a short MoCo pretrain checkpoint and from a random init."""
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from mocobench.core.errors import DataError
from mocobench.core.records import read_metrics
from mocobench.evaluate import lowshot, svm
from mocobench.evaluate.ap import step_ap, voc_ap
from mocobench.evaluate.feature_file import write_npz
from mocobench.evaluate.svm_problem import l2_normalize, problem_costs
from mocobench.evaluate.svm_reference import SklearnSVM, reference_svc
from mocobench.evaluate.svm_solver import TorchSVM


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small problems on a shared 2-core machine: one intra-op thread avoids contention stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blobs(n, d, classes, seed, signal=1.5):
    """Multi-label features: non-negative noise plus one prototype per present class; ~8% difficult."""
    rng = np.random.default_rng(seed)
    protos = rng.random((classes, d)) * (rng.random((classes, d)) < 0.3)
    y = (rng.random((n, classes)) < 0.3).astype(np.int8)
    x = np.maximum(signal * y @ protos + rng.normal(size=(n, d)), 0).astype(np.float32)
    y[(y == 1) & (rng.random(y.shape) < 0.08)] = -1
    return x, y


# --- AP -------------------------------------------------------------------------------------------------
def test_voc_ap_all_point_interpolation_by_hand():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    # positives at ranks 1, 4, 5: precision 1, 2/4, 3/5; the envelope lifts rank 4 to 3/5
    assert voc_ap([1, 0, 0, 1, 1], scores) == pytest.approx((1 + 0.6 + 0.6) / 3)
    assert step_ap([1, 0, 0, 1, 1], scores) == pytest.approx((1 + 0.5 + 0.6) / 3)  # no interpolation
    # not the VOC2007 11-point AP, which would give (6 * 1 + 5 * 0.6) / 11 here
    assert voc_ap([1, 0, 0, 1, 1], scores) != pytest.approx((6 + 5 * 0.6) / 11)
    assert voc_ap([1, 0, 1, 0, 1], scores) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert np.isnan(voc_ap([0, 0, -1], [1.0, 2.0, 3.0]))
    # columns are independent rankings; column 2: precision 1/2 at rank 2 is lifted to 2/3 (rank 3)
    cols = voc_ap(np.array([[1, 0], [0, 1], [1, 1]]), np.array([[3, 3], [2, 2], [1, 1]]))
    assert cols == pytest.approx([(1 + 2 / 3) / 2, (2 / 3 + 2 / 3) / 2])


def test_step_ap_groups_ties_and_matches_sklearn():
    from sklearn.metrics import average_precision_score
    # scores 0.9 | 0.5 0.5 | 0.1: thresholds give (R, P) = (1/2, 1), (1, 2/3)
    assert step_ap([1, 0, 1, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 30))
        y = rng.integers(0, 2, n) * 2 - 1
        s = rng.integers(0, 4, n).astype(float)  # many ties
        if (y > 0).any():
            assert step_ap(y, s) == pytest.approx(average_precision_score(y, s))


def test_voc_ap_breaks_ties_like_vissl_in_tied_and_untied_columns():
    """Tied scores rank in the reverse of a stable ascending sort (later images first), as VISSL's ranking;
    one call mixes columns with ties (sorted again, stably) and without (the unstable sort's order)."""
    # hand case: scores tie at 0.5; the later image (a positive) ranks first: precision 1/1, then 2/3
    assert voc_ap([1, 0, 1], [0.9, 0.5, 0.5]) == pytest.approx(1.0)
    assert voc_ap([1, 1, 0], [0.9, 0.5, 0.5]) == pytest.approx((1 + 2 / 3) / 2)
    rng = np.random.default_rng(0)
    labels = rng.random((300, 12)) < 0.2
    scores = rng.normal(size=(300, 12)) + labels
    scores[:, ::2] = np.round(scores[:, ::2], 1)  # every other column full of ties

    def one_column(y, s):
        ranked = y[np.argsort(s, kind="stable")[::-1]]
        precision = np.cumsum(ranked) / np.arange(1, len(y) + 1)
        return np.maximum.accumulate(precision[::-1])[::-1][ranked].mean()

    expected = [one_column(labels[:, j], scores[:, j]) for j in range(12)]
    assert voc_ap(labels, scores) == pytest.approx(expected, abs=1e-12)


# --- protocol rules -------------------------------------------------------------------------------------
def test_train_targets_make_difficult_negative():
    labels = np.array([[1, 0], [0, -1], [-1, 1]])
    assert svm.train_targets(labels).tolist() == [[1, -1, -1], [-1, -1, 1]]
    assert svm.as_multilabel(np.array([2, 0])).tolist() == [[0, 0, 1], [1, 0, 0]]


def _angle(deg):
    return [np.cos(np.radians(deg)), np.sin(np.radians(deg))]


@pytest.mark.parametrize("solver", ["torch", "sklearn"])
def test_difficult_images_are_negatives_in_training_and_dropped_at_test(solver):
    """Train: positives at 0 deg, absent images at 180 deg, difficult ones at 90 deg. Only if the difficult
    images train as negatives does the SVM learn to push 90 deg down, which ranks the test positives
    (at -90 deg) above the test negatives (at +90 deg). The test difficult images (at -60 deg) score above
    every positive: counted as negatives they would cost AP, dropped they do not."""
    rng = np.random.default_rng(0)
    jitter = lambda deg, n: np.array([_angle(deg + j) for j in rng.uniform(-3, 3, n)])  # noqa: E731
    x = np.concatenate([jitter(0, 30), jitter(180, 30), jitter(90, 15)]).astype(np.float32)
    y = np.array([1] * 30 + [0] * 30 + [-1] * 15)[:, None]
    xt = np.concatenate([jitter(-90, 10), jitter(90, 10), jitter(-60, 5)]).astype(np.float32)
    yt = np.array([1] * 10 + [0] * 10 + [-1] * 5)[:, None]
    res = svm.voc07_svm(x, y, xt, yt, svm.SVMSolverOptions(solver=solver, costs=[0.1, 1.0, 10.0]), progress=False)
    assert res.test_ap[0] == pytest.approx(1.0)
    # the same SVMs with the difficult images left out of training cannot tell the test sets apart
    keep = y[:, 0] != -1
    blind = svm.voc07_svm(x[keep], y[keep], xt, yt, svm.SVMSolverOptions(solver=solver, costs=[0.1, 1.0, 10.0]),
                          progress=False)
    assert blind.test_ap[0] < 0.9


def test_choose_costs_first_best_and_nan_is_worst():
    cv = np.array([[0.5, 0.7, 0.7], [np.nan, 0.2, 0.1], [0.3, np.nan, 0.3]])
    assert svm.choose_costs(cv).tolist() == [1, 1, 0]


def test_folds_are_sklearn_stratified_without_shuffle():
    from sklearn.model_selection import StratifiedKFold
    y = np.array([1, -1, -1, 1, -1, -1, 1, -1, -1, -1, 1, -1])
    held = svm.stratified_folds(y, 3)
    ref = [test for _, test in StratifiedKFold(3).split(np.zeros(12), y)]
    assert [h.tolist() for h in held] == [r.tolist() for r in ref]
    assert sorted(np.concatenate(held).tolist()) == list(range(12))
    assert all((y[h] == 1).sum() in (1, 2) for h in held)  # positives spread over the folds


def test_protocols_on_a_features_file_import_neither_torchvision_nor_sklearn():
    """`eval svm|lowshot|knn|linear --features` only reads a file: its start (part of the end-to-end time of
    `bench svm`) loads no torchvision (~2 s with the torch._dynamo it pulls in) and no sklearn."""
    code = ("import sys; import mocobench.evaluate.svm, mocobench.evaluate.lowshot, mocobench.evaluate.svm_process, "
            "mocobench.evaluate.knn, mocobench.evaluate.linear; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torchvision', 'sklearn'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_folds_equal_sklearn_on_random_label_vectors():
    """The native split is sklearn's StratifiedKFold (no shuffle) on +-1 vectors of any balance and order,
    including classes rarer than the number of folds and a vector that starts with a positive."""
    from sklearn.model_selection import StratifiedKFold
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(6, 80))
        y = np.where(rng.random(n) < rng.uniform(0.02, 0.6), 1, -1)
        for folds in (2, 3, 5):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    ref = [t.tolist() for _, t in StratifiedKFold(folds).split(np.zeros(n), y)]
                except ValueError:
                    with pytest.raises(ValueError, match="cannot be greater"):
                        svm.stratified_folds(y, folds)
                    continue
            assert [h.tolist() for h in svm.stratified_folds(y, folds)] == ref, (trial, folds, y.tolist())


def _noisy_labels(rng):
    """50-d, one informative (scaled) dimension, 10% of labels flipped: large C fits the flips."""
    n, d = 90, 50
    y01 = (rng.random(n) < 0.4).astype(np.int8)
    x = rng.normal(size=(n, d))
    x[:, 0] = 3 * (x[:, 0] + 1.5 * (2 * y01 - 1))
    flip = rng.random(n) < 0.1
    y01[flip] = 1 - y01[flip]
    return x + 2, y01


def _correlated_nuisance(rng):
    """x1 = label + nuisance, x2 = the same nuisance: only a large C learns to subtract x2 from x1; a small C
    stays near the class-mean difference, which the nuisance swamps."""
    n = 150
    y01 = (rng.random(n) < 0.4).astype(np.int8)
    nuisance = 3 * rng.normal(size=n)
    x = np.stack([(2 * y01 - 1) * 0.5 + nuisance + 0.1 * rng.normal(size=n), nuisance + 0.1 * rng.normal(size=n),
                  np.full(n, 10.0)], 1)
    return x, y01


@pytest.mark.parametrize("make,best", [(_noisy_labels, 0), (_correlated_nuisance, 1)])
def test_cv_picks_the_right_cost(make, best):
    """Two constructed cases where one of the costs [0.01, 1000] is clearly right. The protocol must choose
    it, exactly as VISSL's cross_val_score(LinearSVC, cv=3, scoring='average_precision') + argmax does."""
    from sklearn.model_selection import cross_val_score
    x, y01 = make(np.random.default_rng(0))
    x = x.astype(np.float32)
    costs = [0.01, 1000.0]
    res = svm.voc07_svm(x, y01[:, None], x[:20], y01[:20, None], svm.SVMSolverOptions(costs=costs), progress=False)
    xn, yy = l2_normalize(x), np.where(y01 == 1, 1, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = [cross_val_score(reference_svc(c), xn, yy, cv=3, scoring="average_precision").mean() for c in costs]
    assert res.chosen[0] == int(np.argmax(ref)) == best
    assert ref[best] - ref[1 - best] > 0.05  # a clear case, not a near-tie
    assert res.cv_ap[0] == pytest.approx(ref, abs=5e-3)


# --- the solvers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("library", ["torch", "openblas"])  # evaluate/blas.py
@pytest.mark.parametrize("kernel_rows", [0, 10**6])  # the shared-basis Newton solver / each problem's own rows
@pytest.mark.parametrize("n,d", [(120, 40), (60, 150)])  # PCA basis (d < n) and Gram eigenbasis (d > n)
def test_torch_solver_reaches_the_liblinear_optimum(n, d, kernel_rows, library, monkeypatch):
    """Per problem (incl. training subsets and a small-row sub-basis), the torch solution scores like
    LinearSVC's and its primal objective is never worse (it is the optimum LinearSVC approaches), whether
    solved in the shared basis or in the coefficients of each problem's own rows (`kernel_newton_solve`),
    with its linear algebra in torch or in OpenBLAS."""
    from mocobench.evaluate import blas
    monkeypatch.setattr(blas, "_library", blas.resolve(library))
    x, y = blobs(n, d, 3, seed=1)
    x = l2_normalize(x)
    t = svm.train_targets(y)
    costs = np.array([0.1, 1.0, 100.0])
    labels = np.repeat(t, 3, axis=0)
    cost = np.tile(costs, 3)
    mask = np.ones_like(labels, dtype=bool)
    mask[2::3, : n // 3] = False  # some problems train on a subset
    mask[1::3, n // 4:] = False  # a few rows only: the sub-basis path
    solver = TorchSVM(x, {"other": x[:7]}, kernel_rows=kernel_rows, kernel_cost_ratio=float("inf"))
    assert solver.use_kernel(n, n) == bool(kernel_rows)
    ours = solver.fit_scores(labels, mask, cost, ("train", "other"))
    assert solver.info and all(i.converged == i.problems for i in solver.info)
    ref = SklearnSVM(x, {"other": x[:7]}, max_iter=100000).fit_scores(labels, mask, cost, ("train", "other"))
    xa = np.hstack([x, np.ones((n, 1))])
    for p in range(len(labels)):
        c = problem_costs(labels[p:p + 1], mask[p:p + 1], cost[p:p + 1])[0]
        w = np.linalg.lstsq(xa, ref["train"][p], rcond=None)[0]  # LinearSVC's w, b (scores are linear in x)
        f_ref = 0.5 * w @ w + np.sum(c * np.maximum(0, 1 - labels[p] * ref["train"][p]) ** 2)
        w_ours = np.linalg.lstsq(xa, ours["train"][p], rcond=None)[0]
        f_ours = 0.5 * w_ours @ w_ours + np.sum(c * np.maximum(0, 1 - labels[p] * ours["train"][p]) ** 2)
        assert f_ours <= f_ref * (1 + 1e-6)
        assert np.abs(ours["train"][p] - ref["train"][p]).max() < 1e-3 * max(1.0, np.abs(ref["train"][p]).max())
        assert np.abs(ours["other"][p] - ref["other"][p]).max() < 1e-3 * max(1.0, np.abs(ref["other"][p]).max())


def test_torch_and_sklearn_protocols_agree_within_0_1_map():
    x, y = blobs(240, 96, 5, seed=2)
    xt, yt = blobs(200, 96, 5, seed=3)
    a = svm.voc07_svm(x, y, xt, yt, svm.SVMSolverOptions(solver="torch"), progress=False)
    b = svm.voc07_svm(x, y, xt, yt, svm.SVMSolverOptions(solver="sklearn"), progress=False)
    assert abs(100 * a.mAP - 100 * b.mAP) < 0.1
    assert np.nanmax(np.abs(a.cv_ap - b.cv_ap)) < 5e-3
    assert 30 < 100 * a.mAP < 100  # a non-trivial problem


def test_mixed_precision_matches_float64():
    x, y = blobs(150, 64, 3, seed=4)
    xt, yt = blobs(100, 64, 3, seed=5)
    a = svm.voc07_svm(x, y, xt, yt, svm.SVMSolverOptions(precision="float64"), progress=False)
    b = svm.voc07_svm(x, y, xt, yt, svm.SVMSolverOptions(precision="mixed"), progress=False)
    assert abs(a.mAP - b.mAP) < 1e-3 and np.nanmax(np.abs(a.cv_ap - b.cv_ap)) < 1e-3


def test_mixed_precision_meets_the_float64_stopping_rule():
    """The default precision takes its CG directions in float32; the solution must still satisfy the
    float64 rule |2-norm of the gradient| <= tol |gradient at 0|, the gradient of
    1/2|w|^2 + sum c (1 - y z.w)_+^2 evaluated by hand in float64 (here with CG steps actually taken)."""
    from mocobench.evaluate.svm_newton import newton_solve
    x, y = blobs(300, 48, 4, seed=7)
    Z = torch.as_tensor(np.hstack([l2_normalize(x), np.ones((300, 1))]), dtype=torch.float64)
    labels = torch.as_tensor(np.where(svm.train_targets(y) > 0, 1.0, -1.0))
    cost = torch.full_like(labels, 0.5)
    res = newton_solve(Z, labels, cost, tol=1e-6, cg_dtype=torch.float32)
    W, info = res.W, res.info
    assert info.cg_iters > 0 and info.converged == info.problems
    z = Z.numpy()
    for p in range(len(labels)):
        w, yl, c = W[p].numpy(), labels[p].numpy(), cost[p].numpy()
        grad = w - 2 * z.T @ (c * yl * np.maximum(0.0, 1 - yl * (z @ w)))
        grad0 = 2 * z.T @ (c * yl)
        assert np.linalg.norm(grad) <= 1e-6 * np.linalg.norm(grad0)
        np.testing.assert_allclose(res.G[p].numpy(), grad, atol=1e-12 * np.linalg.norm(grad0))


def test_a_chain_starts_from_the_previous_costs_gradient_rescaled():
    """The next cost of a chain starts from the gradient at the previous solution for the new costs, taken
    from the old gradient without a product (`rescaled_gradient`): it must equal the float64 gradient by hand
    at the new costs, and so must the scores and K u a warm start of the kernel path carries."""
    from mocobench.evaluate.svm_kernel import kernel_newton_solve
    from mocobench.evaluate.svm_newton import newton_solve, rescaled_gradient
    x, y = blobs(200, 16, 3, seed=3)
    Z = torch.as_tensor(np.hstack([l2_normalize(x), np.ones((200, 1))]), dtype=torch.float64)
    labels = torch.as_tensor(np.where(svm.train_targets(y) > 0, 1.0, -1.0))
    weight = torch.where(labels > 0, 2.0, 1.0).double()
    old, new = 0.3 * weight, 3.0 * weight
    res = newton_solve(Z, labels, old, tol=1e-6)
    ratio = torch.full((len(labels),), 10.0, dtype=torch.float64)
    G = rescaled_gradient(res.W, res.G, ratio)
    z = Z.numpy()
    for p in range(len(labels)):
        w, yl, c = res.W[p].numpy(), labels[p].numpy(), new[p].numpy()
        by_hand = w - 2 * z.T @ (c * yl * np.maximum(0.0, 1 - yl * (z @ w)))
        np.testing.assert_allclose(G[p].numpy(), by_hand, rtol=0, atol=1e-12 * np.abs(by_hand).max())
    K = Z @ Z.T
    Kpad = torch.zeros(len(labels), 201, 201, dtype=torch.float64)
    Kpad[:, :200, :200] = K
    beta, O, KU, info = kernel_newton_solve(Kpad, labels, old, tol=1e-6)
    assert info.converged == info.problems
    KU_new = rescaled_gradient(O, KU, ratio)
    for p in range(len(labels)):
        b, yl, c = beta[p].numpy(), labels[p].numpy(), new[p].numpy()
        u = b - 2 * c * yl * np.maximum(0.0, 1 - yl * (K.numpy() @ b))
        np.testing.assert_allclose(O[p].numpy(), K.numpy() @ b, atol=1e-10)
        np.testing.assert_allclose(KU_new[p].numpy(), K.numpy() @ u, rtol=0, atol=1e-10 * np.abs(K.numpy() @ u).max())
    warm, _, _, _ = kernel_newton_solve(Kpad, labels, new, tol=1e-6, B0=beta, O0=O, KU0=KU_new)
    cold, _, _, _ = kernel_newton_solve(Kpad, labels, new, tol=1e-6)
    np.testing.assert_allclose((warm @ K).numpy(), (cold @ K).numpy(), atol=1e-4)


# --- low-shot -------------------------------------------------------------------------------------------
def test_lowshot_draws_k_positives_and_c_minus_1_k_negatives_seeded():
    _, y = blobs(400, 4, 4, seed=6)
    idx = lowshot.draw_samples(y, k=4, sample=0, seed=0)
    assert idx.shape == (4, 16)
    for c in range(4):
        assert (y[idx[c, :4], c] == 1).all() and (y[idx[c, 4:], c] == 0).all()  # never a difficult image
        assert len(set(idx[c].tolist())) == 16
    assert np.array_equal(idx, lowshot.draw_samples(y, 4, 0, 0))
    assert not np.array_equal(idx, lowshot.draw_samples(y, 4, 1, 0))
    assert not np.array_equal(idx, lowshot.draw_samples(y, 4, 0, 1))
    with pytest.raises(DataError, match="k=500 needs 500 positives .* of class 'c0'"):
        lowshot.draw_samples(y, 500, 0, 0, ["c0", "c1", "c2", "c3"])


def test_lowshot_reports_the_test_selected_cost_statistics():
    x, y = blobs(300, 48, 3, seed=7)
    xt, yt = blobs(150, 48, 3, seed=8)
    opts = svm.SVMSolverOptions(costs=[0.01, 1.0, 100.0])
    res = lowshot.lowshot_svm(x, y, xt, yt, opts, k_values=(1, 4), n_samples=3, seed=0, selection="val",
                              progress=False)
    assert set(res.samples) == {f"k{k}_sample{s}" for k in (1, 4) for s in range(3)}
    assert res.samples["k4_sample2"].shape == (3, 12)
    for k in (1, 4):
        test = res.test_map[k]
        assert test.shape == (3, 3)
        best = int(np.argmax(test.mean(axis=0)))
        row = res.summary("test")[k]
        assert row["cost"] == opts.costs[best]
        col = 100 * test[:, best]
        assert (row["mean"], row["min"], row["max"]) == pytest.approx((col.mean(), col.min(), col.max()))
        assert row["std"] == pytest.approx(np.std(col))  # population std, as VISSL's np.std
        val_best = int(np.argmax(res.val_map[k].mean(axis=0)))
        assert res.summary("val")[k]["mean"] == pytest.approx(100 * test[:, val_best].mean())
    # each (k, sample, class, cost) SVM is exactly LinearSVC on the drawn images
    idx = res.samples["k4_sample1"][2]
    lab = np.where(np.arange(12) < 4, 1, -1)
    clf = reference_svc(1.0).fit(l2_normalize(x)[idx], lab)
    ours = TorchSVM(l2_normalize(x)).fit_scores(np.where(np.isin(np.arange(300), idx[:4]), 1, -1)[None],
                                                np.isin(np.arange(300), idx)[None], np.array([1.0]))["train"][0]
    assert np.abs(ours - clf.decision_function(l2_normalize(x))).max() < 1e-3


def test_lowshot_ap_of_all_classes_at_once_equals_the_per_class_ap():
    """Ranking every class's columns in one call (difficult images pushed below every score) gives each
    class's AP without its difficult images, NaN for a class without positives, ties included."""
    rng = np.random.default_rng(9)
    M, C, K = 60, 4, 3
    labels = rng.choice([-1, 0, 1], size=(M, C), p=[0.1, 0.6, 0.3])
    labels[:, 2] = np.where(labels[:, 2] == 1, 0, labels[:, 2])  # class 2: no positives
    scores = np.round(rng.normal(size=(C * K, M)), 1)  # rounded: many ties
    got = lowshot._classes_ap(labels, scores, K)
    want = np.stack([lowshot._class_ap(labels[:, c], scores[c * K:(c + 1) * K]) for c in range(C)])
    assert got.shape == (C, K) and np.isnan(got[2]).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_lowshot_groups_the_samples_of_a_k_once_a_draw_spans_a_quarter_of_the_rows():
    few, many = np.arange(4).reshape(2, 2), np.arange(12).reshape(2, 6)  # 4 and 12 of 40 rows
    draws = {(1, 0): few, (1, 1): few, (8, 0): many, (8, 1): many + 20, (16, 0): many}
    assert lowshot._solve_groups(draws, 40) == [[(1, 0)], [(1, 1)], [(8, 0), (8, 1)], [(16, 0)]]


def test_lowshot_merges_the_k_values_the_solver_takes_through_its_shared_basis():
    few, many = np.arange(4).reshape(2, 2), np.arange(12).reshape(2, 6)  # 4 and 12 of 40 rows
    draws = {(1, 0): few, (4, 0): many, (4, 1): many + 1, (8, 0): many + 20, (8, 1): many, (16, 0): many + 3,
             (16, 1): many + 25}  # the k groups span 13, 24 and 24 rows
    large = [(4, 0), (4, 1), (8, 0), (8, 1), (16, 0), (16, 1)]
    assert lowshot._solve_groups(draws, 40, lambda n, rows: False) == [[(1, 0)], large]
    assert lowshot._solve_groups(draws, 40, lambda n, rows: rows < 15) == [[(1, 0)], large[:2], large[2:]]
    seen = []
    kernel = lambda rows_per_problem, rows_in_call: seen.append((rows_per_problem, rows_in_call)) or True
    assert lowshot._solve_groups(draws, 40, kernel) == lowshot._solve_groups(draws, 40)
    assert seen == [(6, 13), (6, 24), (6, 24)]  # rows of one problem (C k), rows of the whole k group


def test_lowshot_grouped_solves_give_the_per_draw_results(monkeypatch):
    """Solving the samples of a k in one batched call changes nothing but the speed."""
    x, y = blobs(300, 48, 3, seed=7)
    xt, yt = blobs(150, 48, 3, seed=8)
    opts = svm.SVMSolverOptions(costs=[0.1, 10.0])
    calls = []
    fit_scores = TorchSVM.fit_scores
    monkeypatch.setattr(TorchSVM, "fit_scores", lambda self, *a, **kw: calls.append(len(a[0])) or fit_scores(self, *a, **kw))
    run = lambda: lowshot.lowshot_svm(x, y, xt, yt, opts, k_values=(2, 16), n_samples=3, seed=0, progress=False)
    grouped = run()
    assert calls == [6, 6, 6, 18]  # k=2 draws (6 rows of 300) one by one; k=16 (up to 144 rows) together
    calls.clear()
    monkeypatch.setattr(lowshot, "_solve_groups", lambda draws, *_: [[key] for key in draws])
    single = run()
    assert calls == [6] * 6
    for k in (2, 16):
        assert np.abs(grouped.test_map[k] - single.test_map[k]).max() < 1e-4


# --- command line and end to end ------------------------------------------------------------------------
def test_cli_on_a_features_file(tmp_path, capsys):
    from mocobench.evaluate.cli import main
    x, y = blobs(90, 16, 3, seed=9)
    xt, yt = blobs(60, 16, 3, seed=10)
    path = write_npz(tmp_path / "f.npz", {"train_feats": x, "train_labels": y, "test_feats": xt,
                                          "test_labels": yt, "class_names": np.array(["a", "b", "c"])})
    assert main(["svm", "--features", str(path), "--costs", "0.1,1,10", "--out", str(tmp_path / "svm")]) == 0
    rec = read_metrics(tmp_path / "svm" / "metrics.json")
    m = rec["metrics"]
    assert rec["benchmark"] == "svm" and rec["config"]["costs"] == [0.1, 1.0, 10.0]
    assert m["mAP"] == pytest.approx(np.mean([m["AP/a"], m["AP/b"], m["AP/c"]]))
    assert set(m["details"]["chosen_cost"].values()) <= {0.1, 1.0, 10.0}
    assert main(["lowshot", "--features", str(path), "--k-values", "1,2", "--samples", "2", "--costs", "1",
                 "--out", str(tmp_path / "ls")]) == 0
    rec = read_metrics(tmp_path / "ls" / "metrics.json")
    assert {"k1/mAP_mean", "k2/mAP_std", "k2/mAP_min", "k2/mAP_max"} <= set(rec["metrics"])
    saved = np.load(tmp_path / "ls" / "lowshot_samples.npz")
    assert saved["k2_sample1"].shape == (3, 6)
    capsys.readouterr()
    assert main(["lowshot", "--features", str(path), "--k-values", "40", "--out", str(tmp_path / "bad")]) == 2
    assert "k=40 needs 40 positives" in capsys.readouterr().err
    assert main(["svm", "--features", str(path), "--solver", "libsvm"]) == 2
    assert "unknown solver 'libsvm'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoints(demo_checkpoints):
    return demo_checkpoints


@pytest.mark.parametrize("which", ["pretrained", "random"])
def test_demo_end_to_end(checkpoints, which, tmp_path):
    from mocobench.evaluate.cli import main
    common = ["--checkpoint", checkpoints[which], "--workers", "0", "--cache-dir", str(tmp_path / "cache")]
    assert main(["svm", "--config", "demo", *common, "--out", str(tmp_path / "svm")]) == 0
    rec = read_metrics(tmp_path / "svm" / "metrics.json")
    m = rec["metrics"]
    assert rec["stage"] == "eval" and rec["benchmark"] == "svm"
    assert m["details"]["n_train"] == 300 and m["details"]["n_test"] == 150
    aps = [v for k, v in m.items() if k.startswith("AP/")]
    assert len(aps) == 10 and all(0 <= a <= 100 for a in aps) and m["mAP"] == pytest.approx(np.mean(aps))
    assert (rec["checkpoint"] is not None) == (which == "pretrained")
    assert main(["lowshot", "--config", "demo", *common, "--k-values", "1,4", "--samples", "2",
                 "--out", str(tmp_path / "ls")]) == 0
    ls = read_metrics(tmp_path / "ls" / "metrics.json")["metrics"]
    # each protocol's own whole-image transform: svm Resize + Resize((32, 32)), lowshot Resize((32, 32))
    assert "resize36_square32" in m["details"]["features"] and "square32" in ls["details"]["features"]
    assert ls["details"]["features"] != m["details"]["features"]
    for k in (1, 4):
        assert 0 <= ls[f"k{k}/mAP_min"] <= ls[f"k{k}/mAP_mean"] <= ls[f"k{k}/mAP_max"] <= 100


def test_exact_newton_directions_are_the_active_set_minimisers_whatever_the_chunking():
    """`direct_directions` against a hand solve per problem: on the active set S the quadratic's minimiser is
    w+ = Z_S^T g with (K_SS + diag(1/2a_S)) g = y_S; problems of very different |S| chunked in any way agree."""
    from mocobench.evaluate.svm_active_set import direct_directions, padded_gram
    gen = torch.Generator().manual_seed(0)
    N, r, P = 40, 12, 5
    Z = torch.randn(N, r, generator=gen, dtype=torch.float64)
    K = Z @ Z.T
    Y = torch.where(torch.rand(P, N, generator=gen) < 0.5, 1.0, -1.0).double()
    A = torch.rand(P, N, generator=gen, dtype=torch.float64) * 3
    for p, n_active in enumerate((40, 3, 25, 0, 9)):  # |S| from all rows to none
        A[p, n_active:] = 0
    W = torch.randn(P, r, generator=gen, dtype=torch.float64)
    expected = []
    for p in range(P):
        S = (A[p] > 0).nonzero()[:, 0]
        g = torch.linalg.solve(K[S][:, S] + torch.diag(0.5 / A[p, S]), Y[p, S]) if len(S) else torch.zeros(0).double()
        expected.append(Z[S].T @ g - W[p])
    expected = torch.stack(expected)
    for max_bytes in (1 << 27, 8 * 9 * 9, 1):  # one chunk; chunks of similar |S|; one problem per chunk
        got, _ = direct_directions(Z, padded_gram(K), Y, A, W, max_bytes=max_bytes)
        assert torch.allclose(got, expected, atol=1e-10), max_bytes


def _active_set_directions(Z, K, Y, A, W):
    """Hand solve of each problem's active-set system (the reference for the exact directions)."""
    out = []
    for p in range(len(W)):
        S = (A[p] > 0).nonzero()[:, 0]
        g = torch.linalg.solve(K[S][:, S] + torch.diag(0.5 / A[p, S]), Y[p, S]) if len(S) else torch.zeros(0).double()
        out.append(Z[S].T @ g - W[p])
    return torch.stack(out)


@pytest.mark.parametrize("n,blocks", [(10, 4), (7, 3), (3, 4), (1, 1)])
def test_gram_matrix_from_its_lower_blocks_is_the_full_product(n, blocks):
    from mocobench.evaluate.svm_basis import gram_matrix
    F = torch.randn(n, 5, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    assert torch.allclose(gram_matrix(F, blocks), F @ F.T, rtol=1e-13, atol=1e-13)


def test_gram_matrix_of_a_transposed_view_is_the_feature_covariance():
    """`Basis` takes F^T F as the Gram matrix of the view F.T (default blocks; 12 rows in 8 blocks)."""
    from mocobench.evaluate.svm_basis import gram_matrix
    F = torch.randn(20, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(gram_matrix(F.T), F.T @ F, rtol=1e-13, atol=1e-13)


def test_in_place_cholesky_solves_like_torch_and_rejects_indefinite_matrices():
    """`cholesky_lower` (LAPACK in place, the other triangle left as it was) gives the same triangular solves
    as torch.linalg.cholesky, and a matrix that is not positive definite is an error, not a silent result."""
    from mocobench.evaluate.native import cholesky_lower
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(3, 30, 50, generator=gen, dtype=torch.float64)
    M = X @ X.mT + 0.1 * torch.eye(30, dtype=torch.float64)
    rhs = torch.randn(3, 30, 4, generator=gen, dtype=torch.float64)
    ref = torch.linalg.cholesky(M)
    L = cholesky_lower(M.clone())
    for upper, A, B in ((False, L, ref), (True, L.mT, ref.mT)):
        assert torch.allclose(torch.linalg.solve_triangular(A, rhs, upper=upper),
                              torch.linalg.solve_triangular(B, rhs, upper=upper), rtol=1e-12, atol=1e-12)
    bad = M.clone()
    bad[1, 5, 5] = -1.0
    with pytest.raises(torch.linalg.LinAlgError, match=r"(matrix|[Ee]lement) 1"):
        cholesky_lower(bad)


@pytest.mark.parametrize("library", ["torch", "openblas"])  # evaluate/blas.py
def test_updated_factorisations_give_the_same_directions_as_fresh_ones(library, monkeypatch):
    """After a first exact step, active sets that gain and lose a few rows (same costs) are solved by updating
    the first step's Cholesky factors (bordering for the added rows, multipliers pinning the dropped ones to
    zero); the directions equal a fresh solve, whether the chunk is reused whole or in part, and an active set
    that moved too far is refactorised instead."""
    from mocobench.evaluate import blas
    from mocobench.evaluate.svm_active_set import direct_directions, padded_gram
    monkeypatch.setattr(blas, "_library", library)
    gen = torch.Generator().manual_seed(1)
    N, r, P = 60, 20, 4
    Z = torch.randn(N, r, generator=gen, dtype=torch.float64)
    K, Kpad = Z @ Z.T, padded_gram(Z @ Z.T)
    Y = torch.where(torch.rand(P, N, generator=gen) < 0.5, 1.0, -1.0).double()
    cost = torch.rand(P, N, generator=gen, dtype=torch.float64) * 3 + 0.1
    A0 = cost * (torch.rand(P, N, generator=gen) < 0.5)
    W = torch.randn(P, r, generator=gen, dtype=torch.float64)
    _, factors = direct_directions(Z, Kpad, Y, A0, W)
    assert all(f is not None for f in factors) and len({id(f[0]) for f in factors}) == 1  # one chunk
    A1 = A0.clone()
    for p, (n_add, n_drop) in enumerate(((2, 1), (0, 3), (4, 0), (1, 1))):
        off, on = (A0[p] == 0).nonzero()[:, 0], (A0[p] > 0).nonzero()[:, 0]
        A1[p, off[:n_add]] = cost[p, off[:n_add]]
        A1[p, on[:n_drop]] = 0
    expected = _active_set_directions(Z, K, Y, A1, W)
    got, again = direct_directions(Z, Kpad, Y, A1, W, factors, update_ratio=1e9)
    assert torch.allclose(got, expected, atol=1e-9)
    assert [f[0] for f in again] == [f[0] for f in factors]  # updated, not refactorised
    got, part = direct_directions(Z, Kpad, Y[1:3], A1[1:3], W[1:3], factors[1:3], update_ratio=1e9)
    assert torch.allclose(got, expected[1:3], atol=1e-9) and part[0][0] is factors[0][0]
    got, one = direct_directions(Z, Kpad, Y[2:3], A1[2:3], W[2:3], factors[2:3], update_ratio=1e9)  # factor copied
    assert torch.allclose(got, expected[2:3], atol=1e-9) and one[0][0] is factors[0][0]
    got, fresh = direct_directions(Z, Kpad, Y, A1, W, factors, update_ratio=1e-9)  # never worth it: refactorise
    assert torch.allclose(got, expected, atol=1e-9) and fresh[0][0] is not factors[0][0]


@pytest.mark.parametrize("batched", [False, True])
def test_gathered_blocks_equal_torch_indexing(batched):
    from mocobench.evaluate.svm_active_set import gather_blocks
    g = torch.Generator().manual_seed(5)
    K = torch.randn(3, 9, 9, generator=g, dtype=torch.float64) if batched else torch.randn(9, 9, generator=g)
    rows, cols = torch.randint(0, 9, (4, 5), generator=g), torch.randint(0, 9, (4, 2), generator=g)
    batch = torch.tensor([2, 0, 0, 1])
    got = gather_blocks(K, rows, cols, batch if batched else None)
    for i in range(4):
        Ki = K[batch[i]] if batched else K
        assert torch.equal(got[i], Ki[rows[i]][:, cols[i]])


# MKL's dpotrf in place / torch.linalg.cholesky (GPU, other BLAS) / OpenBLAS's dpotrf and dtrsm (evaluate/blas.py)
@pytest.mark.parametrize("path", ["mkl", "torch", "openblas"])
def test_factors_of_an_earlier_cost_are_rebuilt_not_gathered_and_give_the_exact_directions(path, monkeypatch):
    """A chain's next cost changes every diagonal 1/2a: factors of another epoch are rebuilt from the K_SS they
    kept (no gather: the new factors share the first chunk's `src`) with the new diagonal, then bordered with
    rows that joined; rows that left become exactly decoupled padding. The directions equal a fresh solve, over two
    cost changes and when rows that had left come back within a cost, and an active set that shrank far below
    its factor's width is refactorised from a new gather instead."""
    from mocobench.evaluate import blas, native
    from mocobench.evaluate.svm_active_set import direct_directions, padded_gram
    if path == "torch":
        monkeypatch.setattr(native, "_mkl_potrf", lambda: None)
    monkeypatch.setattr(blas, "_library", "openblas" if path == "openblas" else "torch")
    gen = torch.Generator().manual_seed(3)
    N, r, P = 60, 20, 4
    Z = torch.randn(N, r, generator=gen, dtype=torch.float64)
    K, Kpad = Z @ Z.T, padded_gram(Z @ Z.T)
    Y = torch.where(torch.rand(P, N, generator=gen) < 0.5, 1.0, -1.0).double()
    weight = torch.where(Y > 0, 2.0, 1.0)  # VOC07's class weights: two diagonal values per problem
    W = torch.randn(P, r, generator=gen, dtype=torch.float64)
    on = torch.rand(P, N, generator=gen) < 0.5
    e0, e1, e2 = object(), object(), object()
    _, f0 = direct_directions(Z, Kpad, Y, 0.5 * weight * on, W, epoch=e0)
    src = f0[0][0].src
    on1 = on.clone()
    for p, (n_add, n_drop) in enumerate(((2, 1), (0, 3), (4, 0), (0, 0))):
        off, act = (~on[p]).nonzero()[:, 0], on[p].nonzero()[:, 0]
        on1[p, off[:n_add]], on1[p, act[:n_drop]] = True, False
    f1 = f0
    # a new cost; the same cost again with the dropped rows back (bordered onto the rebuilt factor); another
    for epoch, C, active in ((e1, 2.0, on1), (e1, 2.0, on), (e2, 7.0, on1)):
        A = C * weight * active
        got, f1 = direct_directions(Z, Kpad, Y, A, W, f1, epoch=epoch, update_ratio=1e9)
        assert torch.allclose(got, _active_set_directions(Z, K, Y, A, W), atol=1e-9), (C, epoch)
        assert all(f[0].epoch is epoch and f[0].src is src for f in f1)  # rebuilt from the first gather
    A = 3.0 * weight * on1
    A[:, 2:] = 0  # two active rows left of ~30: a fresh gather of 2 x 2 costs less than a 30-wide rebuild
    got, fresh = direct_directions(Z, Kpad, Y, A, W, f1, epoch=object())
    assert torch.allclose(got, _active_set_directions(Z, K, Y, A, W), atol=1e-9)
    assert all(f is None or f[0].src is not src for f in fresh)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_freed_blocks_without_page_faults():
    """After `keep_freed_memory`, a freed 64 MB block is handed out again from malloc's heap (once the heap
    has grown to fit it): refilling it takes a handful of page faults, not one per 4 KB page (16384) as
    the fresh mmap of every allocation that size does by default."""
    import resource

    from mocobench.evaluate.native import keep_freed_memory
    if not keep_freed_memory():
        pytest.skip("not glibc")

    def faults_of_fresh_block() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(8 << 20, dtype=torch.float64)
        block.fill_(1.0)
        del block
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert min(faults_of_fresh_block() for _ in range(12)) < 1000


def test_process_settings_are_made_by_the_entry_point_not_by_validation_or_solvers(monkeypatch):
    """Threads and malloc retention are process-wide: `check_solver` only validates, building a solver sets
    nothing, and `configure_svm_process` (called once by the evaluators' `run`) sets the threads when asked
    and has malloc keep freed memory only for the torch solver on the CPU."""
    from mocobench.evaluate import native, svm_process
    threads, kept = [], []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(native, "keep_freed_memory", lambda: kept.append(1) or True)
    monkeypatch.setattr(svm_process, "keep_freed_memory", native.keep_freed_memory)
    svm.SVMSolverOptions(threads=3).check_solver()
    TorchSVM(np.eye(4, 3))
    assert threads == [] and kept == []
    svm_process.configure_svm_process("torch", "cpu", 3)
    assert threads == [3] and kept == [1]
    svm_process.configure_svm_process("sklearn", "cpu", 0)
    assert threads == [3] and kept == [1]


def test_kernel_path_is_chosen_by_its_cost_against_the_shared_basis():
    """`use_kernel` at the shapes it was measured on: VOC07 3-fold CV at 1,000 images (667 rows per problem,
    rank 1,000: one factorisation = 99 row-passes) goes to the shared basis; low-shot k = 16 at 1,000 images
    (320 rows: 11 passes) and k = 32 at VOC07 size (640 rows of ~3,200, rank 2,049: 14) to the kernel path."""
    from types import SimpleNamespace
    svm_like = lambda rank, ratio=30.0: SimpleNamespace(gram=object(), kernel_rows=700, kernel_cost_ratio=ratio,
                                                        basis=SimpleNamespace(rank=rank))
    assert not TorchSVM.use_kernel(svm_like(1000), 667, 1000)
    assert TorchSVM.use_kernel(svm_like(1000), 320, 1000)
    assert TorchSVM.use_kernel(svm_like(2049), 640, 3200)
    assert TorchSVM.use_kernel(svm_like(1000, 100.0), 667, 1000)  # the ratio is the threshold
    assert not TorchSVM.use_kernel(svm_like(10**6, float("inf")), 701, 10**6)  # never beyond kernel_rows
    assert not TorchSVM.use_kernel(SimpleNamespace(gram=None, kernel_rows=700, kernel_cost_ratio=30.0), 10, 10)
