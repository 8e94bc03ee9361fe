"""`mocobench bench svm`: the synthetic VOC07-like data, and a tiny side-by-side run of sklearn's LinearSVC
(reference) and the batched torch solver through the whole protocol, each in its own process."""
import json

import numpy as np
import pytest

from mocobench.bench import svm as bench


def test_synthetic_voc_is_voc_like_and_seeded():
    d = bench.synthetic_voc(600, 300, 64, classes=20, seed=1)
    assert d["train_feats"].shape == (600, 64) and d["test_feats"].shape == (300, 64)
    assert d["train_feats"].dtype == np.float32 and (d["train_feats"] >= 0).all()  # post-ReLU features
    y = d["train_labels"]
    assert y.shape == (600, 20) and set(np.unique(y)) == {-1, 0, 1}
    present = (y != 0).mean(0)
    assert present.argmax() == 14  # "person", by far VOC07's most frequent class
    assert 0.25 < present[14] < 0.55 and present[16] < 0.06
    assert 0.02 < (y == -1).sum() / (y != 0).sum() < 0.16  # ~8% of the positives are difficult
    again = bench.synthetic_voc(600, 300, 64, classes=20, seed=1)
    assert all(np.array_equal(d[k], again[k]) for k in d)
    assert not np.array_equal(d["train_feats"], bench.synthetic_voc(600, 300, 64, classes=20, seed=2)["train_feats"])
    # min_count lifts the rare classes (low-shot k needs k clean positives per class), the frequent ones stay
    lifted = bench.synthetic_voc(600, 300, 64, classes=20, seed=1, min_count=60)["train_labels"]
    assert (lifted != 0).sum(0).min() > 40 and (y != 0).sum(0).min() < 20
    assert abs((lifted[:, 14] != 0).mean() - present[14]) < 0.1


def test_bench_runs_both_solvers_and_they_agree(capsys, tmp_path):
    assert bench.main(["--n-train", "150", "--n-test", "120", "--dim", "48", "--classes", "4",
                       "--costs", "0.1,1,10", "--solvers", "torch,sklearn"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])  # the last line is the JSON summary
    assert res["benchmark"] == "svm" and "150 train / 120 test, 48-d, 4 classes" in res["data"]
    assert res["speedup"] == pytest.approx(res["sklearn_seconds"] / res["torch_seconds"])  # sklearn is the reference
    assert res["abs_delta_mAP"] < 0.1 and res["abs_delta_mAP"] == pytest.approx(abs(res["torch_mAP"] - res["sklearn_mAP"]))
    assert res["torch_peak_rss_mib"] > 50 and res["sklearn_peak_rss_mib"] > 50
    for name in ("torch", "sklearn"):  # end to end: process start and imports, the features file, the protocol
        parts = res[f"{name}_start_seconds"] + res[f"{name}_load_seconds"] + res[f"{name}_protocol_seconds"]["total"]
        assert res[f"{name}_start_seconds"] > 0 and res[f"{name}_seconds"] >= parts
    assert any(line.startswith("  speedup") for line in out)
    # a features file instead of synthetic data, torch alone
    d = bench.synthetic_voc(80, 60, 16, classes=3)
    from mocobench.evaluate.feature_file import write_npz
    path = write_npz(tmp_path / "f.npz", d)
    assert bench.main(["--features", str(path), "--solvers", "torch", "--costs", "1"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "torch_mAP" in res and "speedup" not in res


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--solvers", "liblinear"])
    assert e.value.code == 2 and "--solvers takes torch and/or sklearn" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--features", "/nonexistent.npz"])
    assert "no such file" in capsys.readouterr().err


def test_bench_lowshot_protocol_compares_the_reported_means(capsys):
    assert bench.main(["--protocol", "lowshot", "--n-train", "240", "--n-test", "120", "--dim", "32", "--classes", "4",
                       "--costs", "0.1,10", "--k-values", "1,4", "--samples", "2", "--solvers", "sklearn,torch"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "low-shot k=1,4 x 2 samples x 2 costs" in out[0]
    res = json.loads(out[-1])
    assert res["protocol"] == "lowshot" and res["k_values"] == [1, 4] and res["samples"] == 2
    ref, new = res["sklearn_mAP_per_k"], res["torch_mAP_per_k"]
    assert set(ref) == set(new) == {"k1", "k4"}
    # the reported figure is the largest gap over k of the mean-over-samples mAP at the chosen cost
    assert res["abs_delta_mAP"] == pytest.approx(max(abs(ref[k] - new[k]) for k in ref))
    assert res["abs_delta_mAP"] <= res["max_abs_delta_AP"] + 1e-9 or res["chosen_cost_differs"] > 0
    assert res["abs_delta_mAP"] < 0.5 and res["torch_mAP"] == pytest.approx((new["k1"] + new["k4"]) / 2)
    assert res["speedup"] == pytest.approx(res["sklearn_seconds"] / res["torch_seconds"])
