"""Data-parallel training and eval under `mlx.launch -n 2 --backend ring` on loopback equal one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mlx_moonshine  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx
from mlx.utils import tree_flatten

from conftest import REPO, write_tiny_corpus
from mlx_moonshine import distributed

LAUNCH = shutil.which("mlx.launch")
pytestmark = pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not on PATH")

TRAIN_YAML = dict(eval_every=3, log_every=1, lr=3e-3, warmup_steps=0, schedule_steps=6, dropout=0.0, rank=4,
                  alpha=8, val_wer_samples=3, aux_loss_rows=3, max_seconds=None, pad_seconds=2.0, compile=False)


def _env() -> dict:
    # The checkout under test first (not an installed copy); one BLAS thread per process on a shared CPU.
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                OPENBLAS_NUM_THREADS="1", MLX_MOONSHINE_CANARY="none")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(n: int, *args) -> list[str]:
    cli = [sys.executable, "-m", "mlx_moonshine", *map(str, args)]
    if n == 1:
        return cli  # no launcher: exactly as today
    return [LAUNCH, "-n", str(n), "--backend", "ring", "-p", str(_free_port()), "--", *cli]


def _quiet_stdin() -> tuple[int, int]:
    """A pipe that stays open and silent: mlx.launch (0.32.4) spins on a stdin at EOF, costing a core's third."""
    return os.pipe()


def _run(n: int, *args, timeout=120) -> subprocess.CompletedProcess:
    quiet_in, keep_open = _quiet_stdin()
    try:
        done = subprocess.run(_cmd(n, *args), capture_output=True, text=True, timeout=timeout, env=_env(),
                              stdin=quiet_in)
    finally:
        os.close(quiet_in)
        os.close(keep_open)
    assert done.returncode == 0 and "error:" not in done.stderr, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def corpus(tiny_model_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    cfg = root / "train.yaml"
    cfg.write_text("".join(f"{k}: {'null' if v is None else v}\n" for k, v in TRAIN_YAML.items()))
    return dict(model=tiny_model_dir, cfg=cfg, train=write_tiny_corpus(root, "train", 11, seed=1),
                val=write_tiny_corpus(root, "val", 5, seed=2), replay=write_tiny_corpus(root, "replay", 12, seed=3))


def _train(n: int, corpus: dict, out: Path, steps: int, resume: bool = False):
    if resume:
        return _run(n, "train", "--resume", out, "--max-steps", steps)
    return _run(n, "train", "--model", corpus["model"], "--train", corpus["train"], "--val", corpus["val"],
                "--replay", corpus["replay"], "--replay-ratio", 0.3, "--batch-size", 3, "-c", corpus["cfg"],
                "--max-steps", steps, "-o", out)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a: Path, b: Path) -> None:
    ra, rb = _rows(a), _rows(b)
    assert [(r["step"], r["kind"]) for r in ra] == [(r["step"], r["kind"]) for r in rb]
    for x, y in zip(ra, rb):
        for key in ("loss", "val_loss", "replay_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)
        assert x.get("val_wer") == y.get("val_wer")
    wa, wb = mx.load(str(a / "adapters.safetensors")), mx.load(str(b / "adapters.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(np.array(wb[k]), np.array(wa[k]), rtol=0, atol=1e-5, err_msg=k)
    # The replay rows' targets (the base's own transcripts) are the same rows, texts and order.
    assert (a / "replay_targets.jsonl").read_text() == (b / "replay_targets.jsonl").read_text()


def test_two_processes_train_like_one_and_resume_with_the_other_count(corpus, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _train(1, corpus, one, 3)
    _train(2, corpus, two, 3)  # global batch 3 (+ replay rows): 2 rows on rank 0, 1 or 2 on rank 1
    _assert_same_run(one, two)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # rank 1 wrote nothing
    assert not list(two.glob(".lock*"))
    # Each run goes on with the other process count: 1 -> 2 and 2 -> 1 processes, still the same run.
    _train(2, corpus, one, 6, resume=True)
    _train(1, corpus, two, 6, resume=True)
    _assert_same_run(one, two)
    assert json.loads((two / "summary.json").read_text())["steps"] == 6


def test_two_processes_eval_like_one(corpus, tmp_path):
    args = ["eval", "--model", corpus["model"], "--manifest", corpus["train"], "--manifest", corpus["replay"],
            "--batch-size", 2, "--quiet"]
    one = _run(1, *args, "-o", tmp_path / "one")
    two = _run(2, *args, "-o", tmp_path / "two")
    assert _without_rtf(two.stdout) == _without_rtf(one.stdout)  # one table: rank 0's
    timing = ("decode_s", "decode_seconds", "rtf", "created", "updated")  # differ between any two runs

    def rows(path):
        return [{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (path / "predictions.jsonl").read_text().splitlines()]

    def summary(path):
        s = json.loads((path / "summary.json").read_text())
        return {"run": {k: v for k, v in s["run"].items() if k not in timing},
                "manifests": {n: {k: v for k, v in m.items() if k not in timing} for n, m in s["manifests"].items()}}

    assert rows(tmp_path / "two") == rows(tmp_path / "one") and len(rows(tmp_path / "one")) == 23
    assert summary(tmp_path / "two") == summary(tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_two_processes_take_the_teacher_cache_from_process_zero(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_MOONSHINE_TEACHER_CACHE", str(tmp_path / "store"))
    one, two = tmp_path / "one", tmp_path / "two"
    first = _train(1, corpus, one, 2)  # fills the store
    assert "from the teacher cache" not in first.stdout + first.stderr
    second = _train(2, corpus, two, 2)  # process 0 reads it, process 1 gets the answers from it
    assert "replay targets: 12 of 12 from the teacher cache" in second.stdout + second.stderr
    _assert_same_run(one, two)


def _without_rtf(table: str) -> list[str]:
    return [line.rsplit(" ", 1)[0] for line in table.splitlines()]


def _rank_pid(launcher: subprocess.Popen, rank: int):
    """The pid of the launched process of `rank` (a child of mlx.launch with MLX_RANK=rank), via /proc."""
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher.pid and f"MLX_RANK={rank}".encode() in env:
            return int(d.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's pid through /proc")
def test_killed_process_stops_the_run_then_resume_continues(corpus, tmp_path):
    run, cfg = tmp_path / "run", tmp_path / "long.yaml"
    opts = dict(TRAIN_YAML, schedule="constant", schedule_steps=None, val_wer_samples=0, eval_every=2)
    cfg.write_text("".join(f"{k}: {'null' if v is None else v}\n" for k, v in opts.items()))
    cmd = _cmd(2, "train", "--model", corpus["model"], "--train", corpus["train"], "--val", corpus["val"],
               "--replay", "none", "--batch-size", 3, "-c", cfg, "--max-steps", 3000, "-o", run)
    quiet_in, keep_open = _quiet_stdin()
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                                stdin=quiet_in)
    try:
        # Wait for a checkpoint past step 4 as long as the launcher lives (a loaded box can take minutes);
        # the deadline only guards against a run that hangs before its first checkpoint.
        state, deadline = run / "checkpoint" / "state.json", time.time() + 600
        while launcher.poll() is None and time.time() < deadline:
            if state.is_file() and json.loads(state.read_text())["step"] >= 4:
                break
            time.sleep(0.1)
        pid = _rank_pid(launcher, 1) if launcher.poll() is None else None
        if pid is None:
            launcher.kill()
            out, _ = launcher.communicate(timeout=60)
            pytest.fail(f"the run did not get going (launcher rc {launcher.returncode}):\n{out[-3000:]}")
        os.kill(pid, signal.SIGKILL)
        out, _ = launcher.communicate(timeout=60)  # ends instead of hanging
    finally:
        if launcher.poll() is None:
            launcher.kill()
        os.close(quiet_in)
        os.close(keep_open)
    assert "error: process 0 of 2" in out and "--resume" in out, out[-2000:]
    step = json.loads(state.read_text())["step"]
    assert 4 <= step < 3000
    _run(2, "train", "--resume", run, "--max-steps", step + 2)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == step + 2 and summary["stop_reason"] == "max_steps"


def test_a_stalled_process_is_stopped_by_the_watchdog(tmp_path):
    code = ("import time\nfrom mlx_moonshine import distributed as d\n"
            "class G:\n    rank = lambda self: 1\n    size = lambda self: 2\n"
            "w = d.World(G())\nwith w.waiting('averaging gradients'):\n    time.sleep(30)\n")
    t0 = time.time()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(_env(), MLX_MOONSHINE_DIST_TIMEOUT="1"))
    assert done.returncode == 2 and time.time() - t0 < 20
    assert "process 1 of 2 waited 1 s for the others while averaging gradients" in done.stderr


def test_one_process_helpers_are_the_identity(tiny_model_dir):
    w = distributed.World()
    assert (w.rank, w.size, w.is_main) == (0, 1, True)
    assert w.shard([5, 6, 7]) == ([5, 6, 7], [0, 1, 2])
    assert w.map_all([1, 2, 3], lambda g: g * 10) == [10, 20, 30]
    assert w.gather({"a": 1}) == [{"a": 1}] and w.broadcast(3) == 3 and w.any(False) is False
    assert w.local_folder(tiny_model_dir) == tiny_model_dir
    if not distributed.launched():  # pytest itself, without a launcher: one process, no mx.distributed.init
        assert distributed.world().size == 1


def test_step_with_a_reduce_and_an_empty_shard_equals_the_plain_step(tiny_model_dir):
    """The distributed step path (sums computed, reduced, then applied) is the plain step when it reduces
    nothing; a micro-batch this process has no rows of (None) adds nothing."""
    import mlx.optimizers as optim

    from mlx_moonshine.adapters.apply import AdapterConfig, apply_adapters
    from mlx_moonshine.loading import load
    from mlx_moonshine.train.batches import make_batch
    from mlx_moonshine.train.step import Stepper, default_loss
    from mlx_moonshine.train.config import TrainArgs

    corpus = write_tiny_corpus(tiny_model_dir.parent / "steps", "c", 3)
    from mlx_moonshine.data import load_manifest

    samples = load_manifest(corpus).samples
    out = []
    for reduce, extra in ((None, []), (lambda acc: acc, [None])):
        model, processor = load(tiny_model_dir)
        apply_adapters(model, AdapterConfig(r=4, dropout=0.0, seed=0))
        opt = optim.AdamW(learning_rate=1e-2)
        step = Stepper(model, opt, default_loss, compile=False, reduce=reduce)
        args = TrainArgs(pad_seconds=2.0)
        for _ in range(2):
            loss, ntoks, finite = step([make_batch(samples, processor, args)] + extra)
        out.append((loss.item(), ntoks.item(), dict(tree_flatten(model.trainable_parameters()))))
    assert out[0][:2] == pytest.approx(out[1][:2], rel=1e-6)
    for k, v in out[0][2].items():
        np.testing.assert_allclose(np.array(out[1][2][k]), np.array(v), atol=1e-6)
