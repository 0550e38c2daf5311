"""Training step time and peak memory: mlx-moonshine vs PyTorch + PEFT, same configuration, one run.

Configuration (issue #4): Moonshine base, batch 2, LoRA r=8 alpha=16 on every q_proj/v_proj (encoder
self-attention, decoder self- and cross-attention), AdamW lr 1e-3, fp32, the same ATC clips in the same order.
A second configuration puts the adapters in the decoder only and feeds precomputed encoder outputs (what the
trainer does automatically when no adapter sits in the encoder).

Each framework runs in its own subprocess so that peak RSS is its own, and the PyTorch one without the
OpenBLAS preload (see `REFERENCE_ENV`). Audio loading and batch building happen before the timed steps. Our
step runs as `train` runs it (compiled, batches padded to the length buckets; --mlx-compile off for the eager
before/after): a step on a batch shape not seen before is a trace plus kernel builds, timed apart; PyTorch's
first --warmup steps are not timed.

--race adds the race against mlx-tune 0.6.0 (its own venv, --mlxtune-python; see mlxtune_child.py): the same
rows once each, training audio seconds per wall second, peak RSS, val WER through our decoder.

    python benchmarks/bench_train.py --model BASE_MLX_DIR --hf BASE_HF_DIR \
        --manifest examples/atc/domain_train.jsonl [--steps 20] [--race] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mlx_moonshine._blas import ENV_DISABLE  # the switch that keeps OpenBLAS out of a process

CONFIGS = {
    "all q/v (encoder + decoder)": {"scope": None, "cached_encoder": False},
    "decoder q/v, cached encoder": {"scope": ["decoder_self", "decoder_cross"], "cached_encoder": True},
}
BATCH, RANK, ALPHA, LR = 2, 8, 16.0, 1e-3


# PyTorch runs without mlx_moonshine's OpenBLAS preload: a process-wide RTLD_GLOBAL OpenBLAS takes over
# torch's BLAS calls too and made transformers ~4.6x slower here (beckett.wav greedy 0.73 s -> 3.37 s).
REFERENCE_ENV = {ENV_DISABLE: "1"}


def peak_rss_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 ** 3 if sys.platform == "darwin" else 1024 ** 2)  # bytes on macOS, KiB on Linux


def batches_of(manifest: str, steps: int):
    from mlx_moonshine.data import load_manifest

    samples = load_manifest(manifest).samples[: BATCH * steps]
    return [samples[i:i + BATCH] for i in range(0, len(samples), BATCH)]


def run_mlx(args, config: dict) -> dict:
    import mlx_moonshine  # noqa: F401
    import mlx.core as mx
    import mlx.optimizers as optim

    from mlx_moonshine.models import fastmath
    from mlx_moonshine.adapters.apply import AdapterConfig, apply_adapters
    from mlx_moonshine.loading import load
    from mlx_moonshine.train.batches import EncoderCache, make_batch
    from mlx_moonshine.train.step import Stepper, default_loss, step_compiled
    from mlx_moonshine.train.config import TrainArgs

    model, processor = load(args.model)
    kw = {"scope": config["scope"]} if config["scope"] else {}
    apply_adapters(model, AdapterConfig(kind="lora", r=RANK, alpha=ALPHA, dropout=0.0,
                                        targets=["q_proj", "v_proj"], **kw))
    model.train()
    # As `train` runs it: the training allocator cache (before the encoder cache fills), the step compiled
    # only off the CPU backend.
    fastmath.training_cpu_cache()
    targs = TrainArgs(batch_size=BATCH)
    cache = EncoderCache(model, processor, targs.pad_seconds) if config["cached_encoder"] else None
    batches = [make_batch(b, processor, targs, cache=cache) for b in batches_of(args.manifest, args.steps)]
    mx.eval([list(b.values()) for b in batches])
    compile_step = step_compiled(None if args.mlx_compile == "default" else args.mlx_compile == "on")
    stepper = Stepper(model, optim.AdamW(learning_rate=LR), default_loss, compile=compile_step)
    out = timed_steps(stepper, batches, args.warmup if not compile_step else 0)
    return dict(out, compiled=compile_step, peak_rss_gb=peak_rss_gb(), mlx_peak_gb=mx.get_peak_memory() / 1024 ** 3)


def shape_key(batch: dict) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()))


def timed_steps(stepper, batches, warmup: int = 0) -> dict:
    """Run one step per batch; a step on a batch shape not seen before is a trace (and, on the CPU, kernel
    builds): timed apart from the steady state. `warmup` more steps are left out of the median (eager)."""
    seen, steady, traces, losses = set(), [], [], []
    t_all = time.perf_counter()
    for i, batch in enumerate(batches):
        t = time.perf_counter()
        loss, _, _ = stepper([batch])
        dt = time.perf_counter() - t
        key = shape_key(batch)
        (traces if key not in seen and stepper.compiled else steady if i >= warmup else []).append(dt)
        seen.add(key)
        losses.append(float(loss))
    return {"step_s": statistics.median(steady) if steady else float("nan"), "steady_steps": len(steady),
            "trace_steps": len(traces), "trace_s": sum(traces), "shapes": len(seen),
            "wall_s": time.perf_counter() - t_all, "first_loss": losses[0], "last_loss": losses[-1]}


# -- the race against mlx-tune ----------------------------------------------------------------------

RACE_TARGETS = ["q_proj", "v_proj"]  # both engines: encoder self-attn, decoder self- and cross-attn (48 layers)


def race_rows(args):
    from mlx_moonshine.data import load_manifest

    train = load_manifest(args.race_train).samples[: args.race_rows]
    val = load_manifest(args.race_val).samples[: args.race_val_rows]
    return train, val


def write_race_npz(train, path: Path) -> float:
    """The prepared 16 kHz clips (shared `prepare_audio`) and texts for mlx-tune's process."""
    import numpy as np

    from mlx_moonshine.audio import AudioConfig, prepare_audio

    d = {"n": np.array(len(train))}
    for i, s in enumerate(train):
        d[f"audio_{i}"] = prepare_audio(s.audio_path, AudioConfig())
        d[f"text_{i}"] = np.array(s.text)
    np.savez(path, **d)
    return sum(len(d[f"audio_{i}"]) for i in range(len(train))) / 16000


def val_wer(model, processor, val) -> dict:
    from mlx_moonshine.decoding import DecodingOptions
    from mlx_moonshine.train.validation import eval_wer

    model.eval()
    t = time.perf_counter()
    w = eval_wer(model, processor, val, DecodingOptions())
    return {"wer": w["wer"], "n": w["n"], "decode_s": time.perf_counter() - t}


def run_race_mlx(args) -> dict:
    """Our side: the same rows in the same order, `--race-batch` per step, the step as `train` runs it
    (compiled, bucketed), AdamW at a constant lr like mlx-tune's; batches built before the clock starts
    (mlx-tune gets its clips pre-decoded too)."""
    import mlx_moonshine  # noqa: F401
    import mlx.core as mx
    import mlx.optimizers as optim

    from mlx_moonshine.models import fastmath
    from mlx_moonshine.adapters.apply import AdapterConfig, apply_adapters
    from mlx_moonshine.loading import load
    from mlx_moonshine.train.batches import make_batch
    from mlx_moonshine.train.step import Stepper, default_loss, step_compiled
    from mlx_moonshine.train.config import TrainArgs

    train, val = race_rows(args)
    model, processor = load(args.model)
    mx.random.seed(0)
    apply_adapters(model, AdapterConfig(kind="lora", r=RANK, alpha=ALPHA, dropout=0.0, targets=RACE_TARGETS))
    model.train()
    fastmath.training_cpu_cache()
    B = args.race_batch[0]
    targs = TrainArgs(batch_size=B)
    batches = [make_batch(train[i:i + B], processor, targs) for i in range(0, len(train), B)]
    mx.eval([list(b.values()) for b in batches])
    stepper = Stepper(model, optim.AdamW(learning_rate=LR, weight_decay=targs.weight_decay), default_loss,
                      compile=step_compiled(None))
    out = timed_steps(stepper, batches)
    audio_s = sum(s.duration or 0.0 for s in train)
    out.update(batch=B, audio_s=audio_s, audio_s_per_s=audio_s / out["wall_s"], steps=len(batches),
               s_per_step_wall=out["wall_s"] / len(batches), peak_rss_gb=peak_rss_gb())
    out["val"] = val_wer(model, processor, val)
    return out


def run_race_eval(args) -> dict:
    """The base model's val WER, then with mlx-tune's fused q/v weights: the same shared decoder."""
    import mlx_moonshine  # noqa: F401
    import mlx.core as mx

    from mlx.utils import tree_flatten

    from mlx_moonshine.loading import load

    _, val = race_rows(args)
    model, processor = load(args.model)
    out = {"base": val_wer(model, processor, val)}
    weights = mx.load(args.race_weights)
    known = {k for k, _ in tree_flatten(model.parameters())}
    missing = sorted(set(weights) - known)
    if missing:
        raise SystemExit(f"mlx-tune weights with no place in the model: {missing[:3]}")
    model.load_weights(list(weights.items()), strict=False)
    out["mlxtune"] = val_wer(model, processor, val)
    out["replaced"] = len(weights)
    return out


def race(args) -> dict:
    """Both trainers, each in its own process, one after the other; val WER through our decoder.

    MLX's CPU backend builds a kernel (a C++ compile) for every new fused shape and keeps it on disk under
    $TMPDIR/mlx: a user's first run on new data starts cold. Each engine therefore first runs in a fresh,
    empty kernel cache ("cold"); ours then runs once more in its now warm cache ("warm"), and mlx-tune too with
    --race-mlxtune-warm (its unpadded clips give it one shape per clip length).
    """
    import tempfile

    train, val = race_rows(args)
    with tempfile.TemporaryDirectory() as tmp:
        npz, fused, mt_out = Path(tmp) / "race.npz", Path(tmp) / "fused.safetensors", Path(tmp) / "mt.json"
        audio_s = write_race_npz(train, npz)
        ours = []
        for b in args.race_batch:
            cache = Path(tmp) / f"kernels-mlx-b{b}"
            cache.mkdir()
            for state in ("cold", "warm"):
                run = child(args, ["--engine", "race", "--race-batch", str(b)], tmpdir=cache)
                ours.append(dict(run, kernel_cache=state))
        hf = Path(tmp) / "moonshine-base-hf"  # mlx-tune picks its Moonshine profile from the path name
        hf.symlink_to(Path(args.hf).resolve())
        cmd = [args.mlxtune_python, str(Path(__file__).with_name("mlxtune_child.py")), "--hf", str(hf), "--data",
               str(npz), "--rank", str(RANK), "--alpha", str(ALPHA), "--lr", str(LR), "--out", str(mt_out),
               "--weights", str(fused), *(["--mlx-blas"] if args.race_mlxtune_blas == "installed" else [])]
        theirs, base = [], None
        cache = Path(tmp) / "kernels-mlxtune"
        cache.mkdir()
        for state in ("cold", "warm") if args.race_mlxtune_warm else ("cold",):
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=dict(env, TMPDIR=str(cache)))
            if run.returncode != 0:
                theirs.append({"error": (run.stderr.strip().splitlines() or ["failed"])[-1], "kernel_cache": state})
                continue
            row = dict(json.loads(mt_out.read_text()), kernel_cache=state)
            ev = child(args, ["--engine", "race-eval", "--race-weights", str(fused)])
            row["val"] = ev.get("mlxtune", ev)
            base = base or ev.get("base")
            theirs.append(row)
    return {"rows": len(train), "val_rows": len(val), "audio_s": audio_s, "mlx": ours, "mlxtune": theirs,
            "base_val": base, "lr": LR, "rank": RANK, "alpha": ALPHA}


def child(args, extra: list, tmpdir=None) -> dict:
    cmd = [sys.executable, __file__, "--model", args.model, "--hf", args.hf, "--race-train", args.race_train,
           "--race-val", args.race_val, "--race-rows", str(args.race_rows), "--race-val-rows",
           str(args.race_val_rows), *extra]
    env = dict(os.environ, TMPDIR=str(tmpdir)) if tmpdir is not None else None
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_torch(args, config: dict) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MoonshineForConditionalGeneration

    import mlx_moonshine  # noqa: F401
    from mlx_moonshine.audio import AudioConfig, pad_batch, prepare_audio
    from mlx_moonshine.tokenizer import Tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = MoonshineForConditionalGeneration.from_pretrained(args.hf, dtype=torch.float32)
    names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    if config["scope"]:
        names = [n for n in names if ".decoder." in n]
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=names))
    model.train()
    tok = Tokenizer(Path(args.hf) / "tokenizer.json")
    batches = []
    for samples in batches_of(args.manifest, args.steps):
        x, lengths = pad_batch([prepare_audio(s.audio_path, AudioConfig()) for s in samples])
        ids = [tok.encode(s.text) for s in samples]
        L = max(len(i) for i in ids) + 1
        dec = np.full((len(ids), L), tok.eos_id)
        lab = np.full((len(ids), L), -100)
        for j, i in enumerate(ids):
            dec[j, : len(i) + 1] = [tok.bos_id] + i
            lab[j, : len(i) + 1] = i + [tok.eos_id]
        mask = (np.arange(x.shape[1])[None] < lengths[:, None]).astype(np.int64)
        b = {"input_values": torch.from_numpy(x), "attention_mask": torch.from_numpy(mask),
             "decoder_input_ids": torch.from_numpy(dec), "labels": torch.from_numpy(lab)}
        if config["cached_encoder"]:
            with torch.no_grad():
                enc = model.base_model.model.model.encoder(b["input_values"], attention_mask=b["attention_mask"])
            b["encoder_outputs"] = (enc.last_hidden_state,)
            b["encoder_attention_mask"] = enc.attention_mask
        batches.append(b)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    times, losses = [], []
    for i, b in enumerate(batches):
        t = time.perf_counter()
        if config["cached_encoder"]:
            out = model.base_model.model.model.decoder(input_ids=b["decoder_input_ids"],
                                                       encoder_hidden_states=b["encoder_outputs"][0],
                                                       encoder_attention_mask=b["encoder_attention_mask"])
            logits = model.base_model.model.proj_out(out.last_hidden_state)
        else:
            logits = model(input_values=b["input_values"], attention_mask=b["attention_mask"],
                           decoder_input_ids=b["decoder_input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(loss))
    return {"step_s": statistics.median(times), "peak_rss_gb": peak_rss_gb(), "first_loss": losses[0],
            "last_loss": losses[-1]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="mlx-moonshine base folder (from `convert`)")
    ap.add_argument("--hf", required=True, help="the same weights as a Hugging Face checkpoint folder")
    ap.add_argument("--manifest", default=str(Path(__file__).parents[1] / "examples/atc/domain_train.jsonl"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--mlx-compile", choices=["default", "on", "off"], default="default",
                    help="our step compiled (default: as `train` runs it) or not, for the before/after")
    ap.add_argument("--race", action="store_true", help="also race mlx-tune (needs --mlxtune-python)")
    ap.add_argument("--race-only", action="store_true", help="only the race")
    ap.add_argument("--mlxtune-python", default=os.environ.get("MLXTUNE_PYTHON"),
                    help="python of a venv with mlx-tune 0.6.0 (pip install 'mlx[cpu]' mlx-tune==0.6.0); "
                         "default $MLXTUNE_PYTHON")
    ap.add_argument("--race-train", default=str(Path(__file__).parents[1] / "examples/atc/domain_train.jsonl"))
    ap.add_argument("--race-val", default=str(Path(__file__).parents[1] / "examples/atc/domain_val.jsonl"))
    ap.add_argument("--race-rows", type=int, default=40, help="training rows, once each, in manifest order")
    ap.add_argument("--race-val-rows", type=int, default=60, help="first val rows decoded for the val WER")
    ap.add_argument("--race-batch", type=lambda v: [int(b) for b in v.split(",")], default=[1, 2],
                    help="our batches, comma-separated (mlx-tune's collator: 1); default 1,2")
    ap.add_argument("--race-mlxtune-blas", choices=["openblas", "installed"], default="openblas",
                    help="mlx-tune with the same OpenBLAS preload as ours (default) or with MLX's reference BLAS "
                         "as its venv installs it (~50x slower matmuls)")
    ap.add_argument("--race-mlxtune-warm", action="store_true",
                    help="run mlx-tune a second time in its warm kernel cache too")
    ap.add_argument("--race-weights", help=argparse.SUPPRESS)
    ap.add_argument("--engine", choices=["mlx", "torch", "race", "race-eval"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if (args.race or args.race_only) and not args.mlxtune_python:
        ap.error("the race needs mlx-tune's python: --mlxtune-python VENV/bin/python (or $MLXTUNE_PYTHON)")

    if args.engine in ("race", "race-eval"):
        print(json.dumps(run_race_mlx(args) if args.engine == "race" else run_race_eval(args)))
        return
    if args.engine:  # child process: one framework, one configuration
        fn = run_mlx if args.engine == "mlx" else run_torch
        print(json.dumps(fn(args, CONFIGS[args.config])))
        return

    results = {"batch": BATCH, "rank": RANK, "steps": args.steps, "warmup": args.warmup, "configs": {},
               "load_avg_start": os.getloadavg()[0]}
    for name in ([] if args.race_only else CONFIGS):
        row = {}
        for engine in ("mlx", "torch"):
            cmd = [sys.executable, __file__, "--engine", engine, "--config", name, "--model", args.model,
                   "--hf", args.hf, "--manifest", args.manifest, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--mlx-compile", args.mlx_compile]
            env = dict(os.environ, **REFERENCE_ENV) if engine == "torch" else None
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                row[engine] = {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
            else:
                row[engine] = json.loads(out.stdout.strip().splitlines()[-1])
        results["configs"][name] = row

    print(f"\nbatch {BATCH}, LoRA r={RANK} on q/v, fp32, {args.steps} steps; ours: median of the steps on shapes "
          f"already traced, PyTorch: after {args.warmup} warm-up steps")
    print(f"{'configuration':30s} {'engine':14s} {'s/step':>8s} {'peak RSS GB':>12s} {'loss first→last':>18s}")
    for name, row in results["configs"].items():
        for engine, label in (("mlx", "mlx-moonshine"), ("torch", "PyTorch+PEFT")):
            r = row[engine]
            if "error" in r:
                print(f"{name:30s} {label:14s} error: {r['error']}")
                continue
            print(f"{name:30s} {label:14s} {r['step_s']:8.3f} {r['peak_rss_gb']:12.2f} "
                  f"{r['first_loss']:8.3f}→{r['last_loss']:.3f}")
        if "error" not in row["mlx"] and "error" not in row["torch"]:
            print(f"{'':30s} {'ratio':14s} PyTorch/MLX step time {row['torch']['step_s'] / row['mlx']['step_s']:.2f}x, "
                  f"memory {row['mlx']['peak_rss_gb'] / row['torch']['peak_rss_gb']:.2f}x of PyTorch's")
    if args.race or args.race_only:
        results["race"] = r = race(args)
        print_race(r)
    results["load_avg_end"] = os.getloadavg()[0]
    print(f"load average (1 min): {results['load_avg_start']:.2f} at the start, {results['load_avg_end']:.2f} at the end")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def print_race(r: dict) -> None:
    print(f"\nrace: {r['rows']} training rows ({r['audio_s']:.0f} s of audio) once each, LoRA r={r['rank']} on q/v, "
          f"lr {r['lr']:g}; val WER on {r['val_rows']} val rows through the shared decoder")
    if (r.get("base_val") or {}).get("wer") is not None:
        print(f"  base model val WER {r['base_val']['wer']:.4f}")
    cold = next((e for e in r["mlxtune"] if e.get("kernel_cache") == "cold" and "error" not in e), None)
    for label, rows in (("mlx-moonshine", r["mlx"]), ("mlx-tune 0.6.0", r["mlxtune"])):
        for e in rows:
            if "error" in e:
                print(f"  {label:14s} ({e.get('kernel_cache')}) error: {e['error']}")
                continue
            extra = (f", {e['trace_steps']} trace steps {e['trace_s']:.1f} s, steady {e['step_s']:.2f} s/step"
                     if "trace_steps" in e else "")
            ratio = f", {e['audio_s_per_s'] / cold['audio_s_per_s']:.2f}x mlx-tune cold" if cold else ""
            print(f"  {label:14s} batch {e['batch']}, kernels {e['kernel_cache']}: {e['audio_s_per_s']:.2f} audio s/s"
                  f"{ratio}, {e['wall_s']:.1f} s wall, {e['wall_s'] / e['steps']:.2f} s/step, peak RSS "
                  f"{e['peak_rss_gb']:.2f} GB, val WER {e.get('val', {}).get('wer', float('nan')):.4f}{extra}")


if __name__ == "__main__":
    main()
