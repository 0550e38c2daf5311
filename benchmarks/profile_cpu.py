"""Where the CPU time of a warm training step, a decoder token or a training race goes, by kind of work and by
thread (Linux perf).

    python benchmarks/profile_cpu.py --model BASE_MLX_DIR --hf BASE_HF_DIR [--mlxtune-python VENV/bin/python] \
        [--out F.json]

Each profile runs in its own process under `perf record` (cpu-clock sampling, every thread) and records only
the timed part (a control FIFO switches sampling on after the warm-up and off after the last step):
  * mlx-moonshine's training step: Moonshine base, batch 2 of the same ATC clips (one batch shape, so a
    compiled, warm step), LoRA r=8 on every q/v, AdamW;
  * PyTorch + PEFT's step on the same batch (without the OpenBLAS preload, as bench_train runs it);
  * mlx-moonshine's compiled per-token decoder step on beckett.wav (greedy, the transcribe path);
  * bench_train's race, both sides with their kernel caches warm (a first, unrecorded run builds them): our
    trainer's step over the first --race-rows rows once each at batch 1, and with --mlxtune-python mlx-tune
    0.6.0's own trainer on the same prepared clips (benchmarks/mlxtune_child.py, its own venv).

Each sample is put in one bucket: matrix products (OpenBLAS/MKL GEMM), MLX's fused kernels (what mx.compile
builds, in MLX's kernel cache), MLX's own primitives (element-wise, copies, reductions, softmax, gathers: MLX's
CPU backend runs these on one thread), PyTorch's other kernels, waiting threads, the Python interpreter, the
OS kernel and the rest. "busy cores" = CPU seconds / wall seconds: 2.0 means both cores of this VM worked the
whole time. What it proves: the GEMMs cost the same in every engine here (same OpenBLAS, or MKL at the same
speed), so no engine can beat another by more than the other's non-GEMM time allows; and the single-threaded
buckets cannot shrink by spreading onto the second core, which is what PyTorch's kernels do.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
FREQ = 999  # samples per second per thread
# Where MLX's CPU backend keeps the shared libraries mx.compile builds (one per fused kernel): $TMPDIR/mlx/<version>/cpu.
KERNEL_CACHE = re.compile(r"/mlx/[0-9][^/]*/cpu/")
BUCKETS = ("matrix products (GEMM)", "MLX fused kernels (mx.compile)", "MLX primitives (element-wise, copies, ...)",
           "PyTorch other kernels", "OpenMP/thread pool waiting", "Python interpreter", "OS kernel",
           "C library (memcpy, malloc)", "other")


def bucket_of(dso: str, sym: str) -> str:
    d, s = dso.lower(), sym.lower()
    if "openblas" in d or "mkl" in d or "gemm" in s or "dnnl" in s or "sgemv" in s:
        return BUCKETS[0]
    if KERNEL_CACHE.search(dso):
        return BUCKETS[1]
    if "libmlx" in d or "core.cpython" in d:
        return BUCKETS[2]
    if "gomp" in d or "omp" in d or "sched_yield" in s or "futex" in s:
        return BUCKETS[4]
    if "libtorch" in d or "libc10" in d:
        return BUCKETS[3]
    if "libpython" in d or d.endswith("python3.11") or "python" in Path(d).name:
        return BUCKETS[5]
    if d == "[kernel.kallsyms]":
        return BUCKETS[6]
    if "libc.so" in d or "libc-" in d or "libstdc++" in d or "ld-linux" in d or "libm.so" in d:
        return BUCKETS[7]
    return BUCKETS[8]


# -- the workloads (child processes) ----------------------------------------------------------------


class Sampling:
    """Switch perf's sampling on and off through its control FIFO (a no-op when not under perf)."""

    def __init__(self):
        ctl, ack = os.environ.get("PROFILE_CTL"), os.environ.get("PROFILE_ACK")
        self.ctl = open(ctl, "w") if ctl else None
        self.ack = open(ack) if ack else None

    def _send(self, cmd: str) -> None:
        if self.ctl is not None:
            self.ctl.write(cmd + "\n")
            self.ctl.flush()
            self.ack.readline()

    def __enter__(self):
        self._send("enable")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self._send("disable")


def mlx_train(args) -> dict:
    import mlx_moonshine  # noqa: F401  (preloads OpenBLAS before mlx)
    import mlx.optimizers as optim

    from mlx_moonshine.adapters.apply import AdapterConfig, apply_adapters
    from mlx_moonshine.data import load_manifest
    from mlx_moonshine.loading import load
    from mlx_moonshine.models import fastmath
    from mlx_moonshine.train.batches import make_batch
    from mlx_moonshine.train.config import TrainArgs
    from mlx_moonshine.train.step import Stepper, default_loss

    model, processor = load(args.model)
    apply_adapters(model, AdapterConfig(kind="lora", r=8, alpha=16.0, dropout=0.0, targets=["q_proj", "v_proj"]))
    model.train()
    fastmath.training_cpu_cache()
    batch = make_batch(load_manifest(args.manifest).samples[:2], processor, TrainArgs(batch_size=2))
    stepper = Stepper(model, optim.AdamW(learning_rate=1e-3), default_loss, compile=True)
    for _ in range(3):  # trace, kernel builds, allocator warm
        stepper([batch])
    with Sampling() as s:
        for _ in range(args.steps):
            stepper([batch])
    return {"unit": "step", "n": args.steps, "wall_s": s.wall, "audio_s": float(batch["lengths"].sum()) / 16000}


def torch_train(args) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MoonshineForConditionalGeneration

    from mlx_moonshine.audio import AudioConfig, pad_batch, prepare_audio
    from mlx_moonshine.data import load_manifest
    from mlx_moonshine.tokenizer import Tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    model = MoonshineForConditionalGeneration.from_pretrained(args.hf, dtype=torch.float32)
    names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=names))
    model.train()
    samples = load_manifest(args.manifest).samples[:2]
    tok = Tokenizer(Path(args.hf) / "tokenizer.json")
    x, lengths = pad_batch([prepare_audio(s.audio_path, AudioConfig()) for s in samples])
    ids = [tok.encode(s.text) for s in samples]
    L = max(len(i) for i in ids) + 1
    dec, lab = np.full((2, L), tok.eos_id), np.full((2, L), -100)
    for j, i in enumerate(ids):
        dec[j, : len(i) + 1], lab[j, : len(i) + 1] = [tok.bos_id] + i, i + [tok.eos_id]
    mask = torch.from_numpy((np.arange(x.shape[1])[None] < lengths[:, None]).astype(np.int64))
    x, dec, lab = torch.from_numpy(x), torch.from_numpy(dec), torch.from_numpy(lab)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        logits = model(input_values=x, attention_mask=mask, decoder_input_ids=dec).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), lab.flatten(), ignore_index=-100).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        step()
    with Sampling() as s:
        for _ in range(args.steps):
            step()
    return {"unit": "step", "n": args.steps, "wall_s": s.wall, "audio_s": float(lengths.sum()) / 16000}


def mlx_decode(args) -> dict:
    import mlx_moonshine  # noqa: F401
    from mlx_moonshine.audio import prepare_audio
    from mlx_moonshine.decoding import DecodingOptions, decode_batch
    from mlx_moonshine.loading import load

    model, processor = load(args.model)
    x = prepare_audio(args.audio, processor.audio)
    options = DecodingOptions()
    decode_batch(model, processor, [x], options)  # traces the step, builds the kernels
    import mlx.core as mx

    memory, _ = model.encode(mx.array(x[None]), None)
    mx.eval(memory)
    from mlx_moonshine.decoding import decode_memory
    import numpy as np

    tokens = 0
    with Sampling() as s:
        for _ in range(args.steps):
            out = decode_memory(model, processor, memory, None, np.array([len(x)]), options)
            tokens += len(out[0].tokens) + 1  # + the step that emitted </s>
    return {"unit": "token", "n": tokens, "wall_s": s.wall, "text": out[0].text}


def mlx_race(args) -> dict:
    """Our side of bench_train's race (the same rows once each, batch 1, compiled, bucketed), kernels warm."""
    import mlx_moonshine  # noqa: F401
    import mlx.core as mx
    import mlx.optimizers as optim

    import bench_train as bt
    from mlx_moonshine.adapters.apply import AdapterConfig, apply_adapters
    from mlx_moonshine.data import load_manifest
    from mlx_moonshine.loading import load
    from mlx_moonshine.models import fastmath
    from mlx_moonshine.train.batches import make_batch
    from mlx_moonshine.train.config import TrainArgs
    from mlx_moonshine.train.step import Stepper, default_loss

    rows = load_manifest(args.manifest).samples[: args.race_rows]
    model, processor = load(args.model)
    apply_adapters(model, AdapterConfig(kind="lora", r=8, alpha=16.0, dropout=0.0, targets=bt.RACE_TARGETS))
    model.train()
    fastmath.training_cpu_cache()
    targs = TrainArgs(batch_size=1)
    batches = [make_batch([s], processor, targs) for s in rows]
    mx.eval([list(b.values()) for b in batches])
    stepper = Stepper(model, optim.AdamW(learning_rate=1e-3, weight_decay=targs.weight_decay), default_loss)
    with Sampling() as s:
        for b in batches:
            stepper([b])
    audio_s = sum(float(b["lengths"].sum()) for b in batches) / 16000
    return {"unit": "audio second", "n": audio_s, "wall_s": s.wall, "audio_s_per_s": audio_s / s.wall}


WORKLOADS = {"mlx-moonshine train step": mlx_train, "PyTorch+PEFT train step": torch_train,
             "mlx-moonshine decoder token": mlx_decode, "mlx-moonshine race (batch 1)": mlx_race}
RACE = ("mlx-moonshine race (batch 1)", "mlx-tune 0.6.0 race (batch 1)")


# -- the parent: perf record, then buckets ------------------------------------------------------------


def workload_command(args, name: str, tmp: Path, result: Path) -> list:
    """The child process of one workload (mlx-tune's: benchmarks/mlxtune_child.py in its own venv)."""
    if name == RACE[1]:
        import bench_train as bt
        from mlx_moonshine.data import load_manifest

        npz, hf = tmp / "race.npz", tmp / "moonshine-base-hf"  # mlx-tune finds its Moonshine profile by name
        if not npz.exists():
            bt.write_race_npz(load_manifest(args.manifest).samples[: args.race_rows], npz)
            hf.symlink_to(Path(args.hf).resolve())
        return [args.mlxtune_python, str(HERE / "mlxtune_child.py"), "--hf", str(hf), "--data", str(npz),
                "--out", str(result), "--weights", str(tmp / "fused.safetensors")]
    return [sys.executable, __file__, "--child", name, "--result", str(result), "--model", args.model,
            "--hf", args.hf, "--manifest", args.manifest, "--audio", args.audio, "--race-rows", str(args.race_rows),
            "--steps", str(args.steps if "train" in name else max(args.steps // 4, 1))]


def profile(args, name: str, tmp: Path) -> dict:
    ctl, ack, data, result = tmp / "ctl", tmp / "ack", tmp / "perf.data", tmp / "result.json"
    for f in (ctl, ack):
        f.unlink(missing_ok=True)
        os.mkfifo(f)
    env = dict(os.environ, PROFILE_CTL=str(ctl), PROFILE_ACK=str(ack))
    if name.startswith("PyTorch"):
        from mlx_moonshine._blas import ENV_DISABLE

        env[ENV_DISABLE] = "1"  # as bench_train runs PyTorch: its own BLAS
    child = workload_command(args, name, tmp, result)
    if name in RACE:  # a first run builds the kernels for every clip shape (warm against warm), unrecorded
        kernels = tmp / f"kernels-{RACE.index(name)}"
        kernels.mkdir(exist_ok=True)
        env["TMPDIR"] = str(kernels)
        subprocess.run(child, env={k: v for k, v in env.items() if not k.startswith("PROFILE_")}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cmd = ["perf", "record", "-q", "-F", str(FREQ), "-D", "-1", "--control", f"fifo:{ctl},{ack}", "-o", str(data),
           "--", *child]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = json.loads(result.read_text())
    if name == RACE[1]:
        out = {"unit": "audio second", "n": out["audio_s"], "wall_s": out["wall_s"],
               "audio_s_per_s": out["audio_s_per_s"]}
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "tid,ip,sym,dso"], capture_output=True,
                            text=True, check=True).stdout
    by_bucket, by_thread, top, thread_bucket = Counter(), Counter(), Counter(), Counter()
    for line in script.splitlines():
        parts = line.split()
        if not parts:
            continue
        tid = parts[0]  # tid, ip, symbol (may hold spaces), (dso)
        dso = parts[-1].strip("()") if parts[-1].startswith("(") else "?"
        sym = " ".join(parts[2:-1]) if len(parts) > 3 else "?"
        b = bucket_of(dso, sym)
        by_bucket[b] += 1
        by_thread[tid] += 1
        thread_bucket[(tid, b)] += 1
        top[(b, Path(dso).name, sym[:60])] += 1
    cpu_s = sum(by_bucket.values()) / FREQ
    per = out["wall_s"] / out["n"]
    rows = {b: round(by_bucket[b] / FREQ / out["n"] * 1000, 2) for b in BUCKETS if by_bucket[b]}
    per_thread = [{b: round(thread_bucket[(tid, b)] / FREQ / out["n"] * 1000, 2) for b in BUCKETS
                   if thread_bucket[(tid, b)]} for tid, _ in by_thread.most_common(2)]
    return dict(out, wall_ms_per_unit=round(1000 * per, 2), cpu_ms_per_unit=rows,
                busy_cores=round(cpu_s / out["wall_s"], 2), threads=len(by_thread),
                thread_ms=per_thread,
                top=[dict(bucket=b, dso=d, symbol=s, ms_per_unit=round(c / FREQ / out["n"] * 1000, 2))
                     for (b, d, s), c in top.most_common(12)])


def profile_lines(name: str, r: dict) -> list[str]:
    """One workload's profile as Markdown: the buckets, all threads and the two busiest, and the top symbols."""
    threads = r["thread_ms"]
    busy = " / ".join(f"{sum(t.values()):.0f}" for t in threads)
    lines = [f"### {name}: {r['wall_ms_per_unit']:.1f} ms per {r['unit']} (wall), {r['busy_cores']:.2f} busy cores; "
             f"the two busiest threads {busy} ms\n",
             f"| where (CPU ms per {r['unit']}) | all threads | share | "
             + " | ".join(f"thread {i + 1}" for i in range(len(threads))) + " |",
             "|---|---|---|" + "---|" * len(threads)]
    total = sum(r["cpu_ms_per_unit"].values())
    for b, ms in sorted(r["cpu_ms_per_unit"].items(), key=lambda kv: -kv[1]):
        if ms >= 0.05:
            lines.append(f"| {b} | {ms:.1f} | {100 * ms / total:.0f}% | "
                         + " | ".join(f"{t.get(b, 0.0):.1f}" for t in threads) + " |")
    lines.append("\ntop symbols: " + "; ".join(f"{t['symbol'] or t['dso']} ({t['dso']}) {t['ms_per_unit']:.1f} ms"
                                             for t in r["top"][:6]) + "\n")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="mlx-moonshine base folder (from `convert`)")
    ap.add_argument("--hf", required=True, help="the same weights as a Hugging Face checkpoint folder")
    ap.add_argument("--manifest", default=str(HERE.parent / "examples/atc/domain_train.jsonl"))
    ap.add_argument("--audio", default=None, help="decoder clip (default: moonshine-voice's beckett.wav)")
    ap.add_argument("--steps", type=int, default=8, help="timed training steps (decoder: steps/4 transcripts)")
    ap.add_argument("--race-rows", type=int, default=40, help="race: the first rows of --manifest, once each")
    ap.add_argument("--mlxtune-python", default=os.environ.get("MLXTUNE_PYTHON"),
                    help="python of a venv with mlx-tune 0.6.0: adds its side of the race")
    ap.add_argument("--only", choices=[*WORKLOADS, RACE[1]], action="append")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(args.result).write_text(json.dumps(WORKLOADS[args.child](args)))
        return
    if shutil.which("perf") is None:
        sys.exit("needs Linux perf (Debian: apt-get install linux-perf)")
    if args.audio is None:
        import importlib.util

        spec = importlib.util.find_spec("moonshine_voice")
        if spec is None:
            sys.exit("no --audio and moonshine-voice is not installed (pip install moonshine-voice)")
        args.audio = str(Path(spec.origin).parent / "assets" / "beckett.wav")
    results = {"load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        names = args.only or [*WORKLOADS, *([RACE[1]] if args.mlxtune_python else [])]
        for name in names:
            results[name] = profile(args, name, Path(tmp))
            print("\n".join(profile_lines(name, results[name])))
    results["load_average_after"] = os.getloadavg()[0]
    print(f"\nload average {results['load_average']:.2f} -> {results['load_average_after']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
