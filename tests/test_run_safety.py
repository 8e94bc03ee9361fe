"""Reruns, reused output folders and bad input: one line on stderr, exit code 2, nothing of the user's lost.

One test per case of the robustness review (reruns of a finished run, a folder of another stage, `data
--force`, out-of-range numbers, unwritable --out, damaged checkpoints, corrupt images, unsafe pickles,
failed sweep stages, signals), then a fuzz matrix of bad values over every command.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mocobench.cli import main
from mocobench.core.records import ATTEMPTS_FILE, STAGE_FILE

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["arch=resnet18_small", "width=8", "image_size=16", "batch_size=8", "moco_k=32", "moco_dim=16",
        "mlp=true", "aug_plus=true", "cos=true", "lr=0.03", "bn_groups=2", "workers=0", "print_freq=2",
        "steps_per_epoch=2", "blur_sigma=[0.1,0.3]"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """2 classes x 8 random 20 px PNGs in ImageFolder layout (train/ and val/)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):
    """A finished 2-epoch pretrain run and the bytes of its record."""
    out = tmp_path_factory.mktemp("runs") / "R"
    assert main(["pretrain", "--data", str(folder), "--out", str(out), "epochs=2", *TINY]) == 0
    return out


def one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err and ": error: " in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- every run folder belongs to one run ------------------------------------------------------------------
def test_rerun_of_a_finished_pretrain_is_a_no_op_and_another_config_is_refused(folder, finished, capsys):
    before = snapshot(finished)
    capsys.readouterr()
    assert main(["pretrain", "--data", str(folder), "--out", str(finished), "epochs=2", *TINY]) == 0
    assert "already finished" in capsys.readouterr().out
    assert snapshot(finished) == before
    assert main(["pretrain", "--data", str(folder), "--out", str(finished), "epochs=2", *TINY,
                 "lr=0.5", "moco_t=0.2"]) == 2
    one_error_line(capsys, "another config", "lr 0.03 -> 0.5", "moco_t 0.07 -> 0.2", "--force")
    assert snapshot(finished) == before
    record = json.loads((finished / "metrics.json").read_text())
    assert record["config"]["lr"] == 0.03 and np.isfinite(record["metrics"]["loss"])


def test_an_eval_into_a_pretrain_folder_is_refused(finished, capsys):
    before = snapshot(finished)
    ckpt = finished / "checkpoint_0001.pth.tar"
    assert main(["eval", "knn", "--checkpoint", str(ckpt), "--data", "unused", "--out", str(finished)]) == 2
    one_error_line(capsys, "holds the pretrain moco run, not eval knn", "choose another --out")
    assert snapshot(finished) == before


def test_force_moves_the_old_run_aside(folder, finished, tmp_path, capsys):
    out = tmp_path / "F"
    assert main(["pretrain", "--data", str(folder), "--out", str(out), "epochs=1", *TINY]) == 0
    old = snapshot(out)
    assert main(["pretrain", "--data", str(folder), "--out", str(out), "epochs=1", *TINY, "lr=0.01", "--force"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("F.replaced-")]
    assert len(aside) == 1 and snapshot(aside[0]) == old  # moved whole, not deleted
    assert json.loads((out / "metrics.json").read_text())["config"]["lr"] == 0.01


def test_data_force_never_deletes_foreign_files(tmp_path, capsys):
    u = tmp_path / "U"
    u.mkdir()
    (u / "thesis.txt").write_text("mine")
    for extra in ([], ["--force"]):
        assert main(["data", "--out", str(u), *extra]) == 2
        one_error_line(capsys, "not a mocobench demo dataset (thesis.txt)", "nothing was changed")
        assert (u / "thesis.txt").read_text() == "mine" and sorted(os.listdir(u)) == ["thesis.txt"]


# --- checked before the expensive part ----------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["pretrain", "batch_size=0"], "'batch_size'"),
    (["pretrain", "epochs=-1"], "'epochs'"),
    (["pretrain", "lr=0"], "'lr'"),
    (["pretrain", "--moco-m", "1.5"], "'moco_m'"),
    (["eval", "knn", "batch_size=-8"], "'batch_size'"),
    (["eval", "knn", "ks=[20,0]"], "'ks'"),
    (["eval", "svm", "costs=[1,-1]"], "'costs'"),
    (["eval", "lowshot", "samples=0"], "'samples'"),
    (["eval", "linear", "epochs=0"], "'epochs'"),
    (["eval", "semisup", "lrs=[0.1,-0.1]"], "'lrs'"),
])
def test_out_of_range_numbers_are_one_line_errors_before_any_work(argv, needle, tmp_path, capsys):
    out = tmp_path / "never"
    assert main([*argv, "--out", str(out)]) == 2
    one_error_line(capsys, needle, "expected a value")
    assert not out.exists()


def test_an_unwritable_out_is_refused_before_the_work(folder, finished, tmp_path, capsys):
    afile = tmp_path / "AFILE"
    afile.write_text("x")
    ckpt = str(finished / "checkpoint_0001.pth.tar")
    feats = tmp_path / "f.npz"
    rng = np.random.default_rng(0)
    np.savez(feats, train_feats=rng.normal(size=(12, 4)).astype(np.float32), train_labels=np.arange(12) % 2,
             test_feats=rng.normal(size=(6, 4)).astype(np.float32), test_labels=np.arange(6) % 2)
    cases = [["pretrain", "--data", str(folder), *TINY, "epochs=1"],
             ["eval", "knn", "--features", str(feats)],
             ["eval", "svm", "--features", str(feats), "--dataset", "imagefolder"]]
    for argv in cases:
        assert main([*argv, "--out", str(afile / "sub")]) == 2, argv
        one_error_line(capsys, str(afile / "sub"), "expected a writable directory")
    assert main(["results", str(finished), "--out", str(afile / "t")]) == 2
    one_error_line(capsys, "AFILE")
    assert main(["convert", "--to", "torchvision", ckpt, str(afile / "c.pth")]) == 2
    one_error_line(capsys, "AFILE")
    assert afile.read_text() == "x"


# --- damaged and unsafe checkpoints --------------------------------------------------------------------------
def test_truncated_checkpoints(folder, finished, tmp_path, capsys):
    trunc = tmp_path / "trunc.pth.tar"
    trunc.write_bytes((finished / "checkpoint_0000.pth.tar").read_bytes()[:5000])
    assert main(["pretrain", "--data", str(folder), "--out", str(tmp_path / "T"), *TINY, "epochs=2",
                 "--resume", str(trunc)]) == 2
    one_error_line(capsys, "trunc.pth.tar", "corrupt")
    # auto-resume skips a damaged newest checkpoint and resumes from the one before
    out = tmp_path / "A"
    assert main(["pretrain", "--data", str(folder), "--out", str(out), *TINY, "epochs=3", "stop_after=2"]) == 0
    newest = out / "checkpoint_0001.pth.tar"
    newest.write_bytes(newest.read_bytes()[:3000])
    capsys.readouterr()
    assert main(["pretrain", "--data", str(folder), "--out", str(out), *TINY, "epochs=3"]) == 0
    captured = capsys.readouterr()
    assert "cannot resume from checkpoint_0001.pth.tar, trying checkpoint_0000.pth.tar" in captured.err
    assert "resumed from" in captured.out and "checkpoint_0000.pth.tar at epoch 1" in captured.out
    assert json.loads((out / "metrics.json").read_text())["metrics"]["epochs"] == 3


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_an_unsafe_checkpoint_is_refused_in_one_line(folder, tmp_path, capsys):
    bad = tmp_path / "bad.pth.tar"
    import torch
    torch.save({"state_dict": {}, "x": Boom()}, bad)
    assert main(["pretrain", "--data", str(folder), "--out", str(tmp_path / "P"), *TINY, "--resume", str(bad)]) == 2
    line = one_error_line(capsys, "refusing to load", "posix.system")
    assert "mocobench convert" in line  # points at a command that takes --trust-checkpoint
    assert main(["eval", "knn", "--checkpoint", str(bad), "--data", str(folder), "--out", str(tmp_path / "K"),
                 "resize=20", "crop=16", "workers=0"]) == 2
    one_error_line(capsys, "refusing to load")


# --- corrupt images ------------------------------------------------------------------------------------------
def test_only_corrupt_images_name_the_files(tmp_path, capsys):
    for c in range(2):
        d = tmp_path / "bad" / "train" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(10):
            (d / f"{i}.jpg").write_bytes(b"" if i % 2 else os.urandom(64))
    assert main(["pretrain", "--data", str(tmp_path / "bad"), "--out", str(tmp_path / "o"), *TINY,
                 "epochs=1", "workers=1"]) == 2
    line = one_error_line(capsys, "unreadable images in a row", ".jpg", "more")
    assert "DataLoader" not in line


# --- failures are visible in results ---------------------------------------------------------------------------
def test_results_lists_failed_and_missing_stages(finished, tmp_path, capsys):
    import shutil
    sweep = tmp_path / "sweep"
    shutil.copytree(finished, sweep / "v1" / "pretrain")
    (sweep / "v1" / "pretrain" / STAGE_FILE).write_text(json.dumps({"variant": "v1", "trial": 0, "stage": "pretrain",
                                                                     "benchmark": "moco"}))
    failed = sweep / "v2" / "pretrain"
    failed.mkdir(parents=True)
    (failed / STAGE_FILE).write_text(json.dumps({"variant": "v2", "trial": 0, "stage": "pretrain", "benchmark": "moco"}))
    (failed / ATTEMPTS_FILE).write_text(json.dumps({"event": "start"}) + "\n"
                                        + json.dumps({"event": "failed", "error": "DataError: no images"}) + "\n")
    waiting = sweep / "v2" / "svm"
    waiting.mkdir(parents=True)
    (waiting / STAGE_FILE).write_text(json.dumps({"variant": "v2", "trial": 0, "stage": "eval", "benchmark": "svm"}))
    capsys.readouterr()
    assert main(["results", str(sweep), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "v2/pretrain: failed (DataError: no images)" in err and "v2/svm: not run" in err
    assert "2 stage(s) without a result (1 failed, 1 not run)" in err
    tables = (sweep / "tables" / "tables.md").read_text()
    assert "| v2/pretrain | v2 | **failed** | DataError: no images |" in tables
    # and as marked cells: the failed variant keeps its row, the missing benchmark its column
    pretrain_rows = [line for line in (sweep / "tables" / "pretrain.md").read_text().splitlines() if "| v2 |" in line]
    assert len(pretrain_rows) == 1 and "**failed**" in pretrain_rows[0]
    svm = (sweep / "tables" / "svm.md").read_text()
    assert "| v2 |" in svm and "**not run**" in svm
    assert main(["results", str(sweep), "--no-plots", "--strict"]) == 1


# --- signals -----------------------------------------------------------------------------------------------------
def test_sigterm_on_a_plain_run_writes_a_checkpoint_and_resumes(folder, tmp_path):
    out = tmp_path / "S"
    argv = [sys.executable, "-m", "mocobench.cli", "pretrain", "--data", str(folder), "--out", str(out), *TINY,
            "epochs=50", "steps_per_epoch=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = out / "log.txt"
    import time
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "epoch 1 [" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "stopped by SIGTERM" in stdout
    ckpts = sorted(out.glob("checkpoint_*.pth.tar"))
    assert ckpts and not (out / "metrics.json").exists()
    # the same command resumes from that checkpoint (not from scratch)
    done = subprocess.run([*argv[:-2], "epochs=3", "steps_per_epoch=0"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "another config (epochs 50 -> 3)" in done.stderr  # the run keeps its config
    resumed = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and "resumed from" not in log.read_text().split("MoCo pretrain:")[-1]:
        time.sleep(0.2)
    resumed.send_signal(signal.SIGTERM)
    stdout, _ = resumed.communicate(timeout=120)
    assert "resumed from" in stdout and "stopped by SIGTERM" in stdout


# --- a fuzz matrix: no command answers bad input with a traceback -----------------------------------------------
BAD_VALUES = ["-1", "0", "abc", "1e999", "[]", "nan"]
FIELDS = {"pretrain": ["batch_size", "epochs", "lr", "moco_k", "moco_t", "crop_min", "workers", "width"],
          "eval knn": ["batch_size", "ks", "temperature", "crop", "workers"],
          "eval svm": ["costs", "folds", "tol", "batch_size"],
          "eval lowshot": ["k_values", "samples", "costs"],
          "eval linear": ["epochs", "lr", "batch_size", "image_size"],
          "eval semisup": ["epochs", "lrs", "head_mults", "batch_size"]}


@pytest.mark.parametrize("command", list(FIELDS))
def test_fuzz_bad_values_never_give_a_traceback(command, tmp_path, capsys):
    for field in FIELDS[command]:
        for value in BAD_VALUES:
            out = tmp_path / f"{field}-{value}"
            rc = main([*command.split(), f"{field}={value}", "--out", str(out), "--data", str(tmp_path / "none")])
            err = capsys.readouterr().err
            assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (field, value, err)


def test_a_transfer_into_a_pretrain_folder_is_refused(finished, capsys):
    pytest.importorskip("detectron2")
    before = snapshot(finished)
    assert main(["transfer", "detectron2", "--recipe", "voc07-c4", "--weights", "none", "--out", str(finished),
                 "--smoke", "--num-gpus", "0"]) == 2
    one_error_line(capsys, "holds the pretrain moco run, not transfer voc07-c4")
    assert snapshot(finished) == before
