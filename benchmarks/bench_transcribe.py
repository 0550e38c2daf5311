"""Transcription speed: mlx-moonshine vs transformers vs onnxruntime vs mlx-audio, same clips, one run.

Every engine gets the same 16 kHz samples (the shared audio pipeline), decodes greedily with the same
token budget (ceil(6.5 x seconds)) and processes each clip in one pass; we report the median wall time
of --repeats runs after one warm-up, the real-time factor (RTF = seconds of compute / seconds of audio)
and each engine's time relative to mlx-moonshine. Also a profile of mlx-moonshine: encoder, decoder
ms/token and the Python/host share of a decoding step.

Each engine runs in its own process, one after the other. The reference engines (transformers,
onnxruntime) run without mlx_moonshine's OpenBLAS preload and never import MLX: a process-wide
RTLD_GLOBAL OpenBLAS takes over torch's BLAS calls as well and made transformers ~4.6x slower here.

    python benchmarks/bench_transcribe.py --model BASE_MLX_DIR --hf BASE_HF_DIR [--repeats 5] [--out F.json]

Engines that are not installed are skipped with a note (torch/transformers: `pip install -e .[dev]`;
onnxruntime + moonshine-cpp for ORT; `pip install mlx-audio --no-deps` for mlx-audio).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Importing mlx_moonshine preloads OpenBLAS unless REFERENCE_ENV says not to (mlx-audio gets it too: a fair
# race). No MLX import at module level: the reference engines' processes never load it.
from mlx_moonshine._blas import ENV_DISABLE
from mlx_moonshine.audio import SAMPLE_RATE, AudioConfig, prepare_audio

REFERENCE_ENV = {ENV_DISABLE: "1"}
CLIPS = ("beckett.wav", "endgame_nagg_nell.wav")


_BUDGETS: dict = {}  # samples -> token budget, set by the parent's --budgets


def budget(audio: np.ndarray) -> int:
    return _BUDGETS[len(audio)]


def median_time(fn, repeats: int):
    fn()  # warm-up (compilation, caches)
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


class MLXEngine:
    name = "mlx-moonshine"

    def __init__(self, model_dir):
        from mlx_moonshine.loading import load

        self.model, self.processor = load(model_dir)

    def __call__(self, audio):
        from mlx_moonshine.decoding import DecodingOptions, decode_batch

        (res,) = decode_batch(self.model, self.processor, [audio], DecodingOptions())
        return res.text

    def profile(self, audio, repeats):
        import mlx.core as mx
        from mlx_moonshine.decoding import DecodingOptions, decode_batch

        x = mx.array(audio[None])
        enc, _ = median_time(lambda: mx.eval(self.model.encode(x)[0]), repeats)
        (res,) = decode_batch(self.model, self.processor, [audio], DecodingOptions())
        n = len(res.tokens) + 1  # decoder steps, the </s> step included
        total, _ = median_time(lambda: self(audio), repeats)
        return {"encoder_s": enc, "decoder_s": total - enc, "tokens": n,
                "decoder_ms_per_token": 1000 * (total - enc) / n}


class TransformersEngine:
    name = "transformers fp32"

    def __init__(self, hf_dir):
        import torch
        from tokenizers import Tokenizer
        from transformers import MoonshineForConditionalGeneration

        self.torch = torch
        self.model = MoonshineForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
        self.tok = Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json"))

    def __call__(self, audio):
        x = self.torch.from_numpy(audio)[None]
        with self.torch.inference_mode():
            out = self.model.generate(input_values=x, max_new_tokens=budget(audio), do_sample=False, num_beams=1)
        return self.tok.decode(out[0].tolist(), skip_special_tokens=True).strip()


class OrtEngine:
    """moonshine-cpp's int8 ORT graphs, driven greedily with onnxruntime (cross K/V from step 0)."""

    name = "onnxruntime (int8 ORT)"

    def __init__(self, hf_dir):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from mlx_moonshine.convert.wheels import resolve_moonshine_cpp

        src, _ = resolve_moonshine_cpp("moonshine-cpp:base-en")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = os.cpu_count() or 1
        find = lambda stem: next(p for p in sorted(Path(src).rglob(f"{stem}.ort")))  # noqa: E731
        self.enc = ort.InferenceSession(str(find("encoder_model")), opts, providers=["CPUExecutionProvider"])
        self.dec = ort.InferenceSession(str(find("decoder_model_merged")), opts, providers=["CPUExecutionProvider"])
        cfg = json.loads((Path(hf_dir) / "config.json").read_text())
        self.layers = cfg["decoder_num_hidden_layers"]
        self.kv_heads = cfg["decoder_num_key_value_heads"]
        self.head_dim = cfg["hidden_size"] // cfg["decoder_num_attention_heads"]
        self.outputs = [o.name for o in self.dec.get_outputs()]
        self.tok = Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json"))

    def __call__(self, audio):
        hidden = self.enc.run(None, {"input_values": audio[None]})[0]
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        past = {f"past_key_values.{i}.{part}.{kv}": empty for i in range(self.layers)
                for part in ("decoder", "encoder") for kv in ("key", "value")}
        tokens = [1]
        for step in range(budget(audio)):
            outs = self.dec.run(None, {"input_ids": np.array([[tokens[-1]]], np.int64),
                                       "encoder_hidden_states": hidden,
                                       "use_cache_branch": np.array([step > 0]), **past})
            nxt = int(outs[0][0, -1].argmax())
            if nxt == 2:
                break
            tokens.append(nxt)
            for name, value in zip(self.outputs[1:], outs[1:]):
                if step == 0 or ".decoder." in name:
                    past[name.replace("present.", "past_key_values.")] = value
        return self.tok.decode(tokens[1:], skip_special_tokens=True).strip()


class MLXAudioEngine:
    """mlx-audio's Moonshine, loaded with the same converted weights."""

    name = "mlx-audio"

    def __init__(self, hf_dir):
        import mlx.core as mx
        from mlx_audio.stt.models.moonshine.moonshine import Model
        from tokenizers import Tokenizer

        cfg = json.loads((Path(hf_dir) / "config.json").read_text())
        self.model = Model(cfg)
        weights = mx.load(str(Path(hf_dir) / "model.safetensors"))
        self.model.load_weights(list(self.model.sanitize(weights).items()))
        mx.eval(self.model.parameters())
        # mlx-audio turns ids into text with an attached HF tokenizer; give it ours (same tokenizer.json).
        self.model._tokenizer = _Decoder(Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json")))

    def __call__(self, audio):
        import mlx.core as mx

        return self.model.generate(mx.array(audio[None]), max_tokens=budget(audio)).text


class _Decoder:
    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


# key -> (engine class, module it needs, environment of its process)
ENGINES = {
    "mlx": (MLXEngine, "mlx", {}),
    "transformers": (TransformersEngine, "transformers", REFERENCE_ENV),
    "ort": (OrtEngine, "onnxruntime", REFERENCE_ENV),
    "mlx-audio": (MLXAudioEngine, "mlx_audio", {}),
}


def run_engine(args) -> dict:
    """Child process: one engine on every clip."""
    if args.engine == "transformers":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    cls = ENGINES[args.engine][0]
    engine = cls(args.model if args.engine == "mlx" else args.hf)
    out = {"name": cls.name, "clips": {}}
    for clip, n_tokens in zip(CLIPS, args.budgets):
        audio = prepare_audio(Path(args.audio_dir) / clip, AudioConfig())
        _BUDGETS[len(audio)] = n_tokens
        t, text = median_time(lambda: engine(audio), args.repeats)
        out["clips"][clip] = {"s": t, "text": text}
        if args.engine == "mlx":
            out["clips"][clip]["profile"] = engine.profile(audio, args.repeats)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="mlx-moonshine model folder (from `convert`)")
    ap.add_argument("--hf", required=True, help="the same weights as a Hugging Face checkpoint folder")
    ap.add_argument("--audio-dir", default=None, help="folder with the clips (default: moonshine_voice assets)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write results as JSON here")
    ap.add_argument("--engine", choices=list(ENGINES), help=argparse.SUPPRESS)  # child process
    ap.add_argument("--budgets", type=lambda v: [int(x) for x in v.split(",")], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.audio_dir is None:
        spec = importlib.util.find_spec("moonshine_voice")
        if spec is None:
            sys.exit("no --audio-dir and moonshine-voice is not installed (pip install moonshine-voice)")
        args.audio_dir = Path(spec.origin).parent / "assets"
    if args.engine:
        Path(args.out).write_text(json.dumps(run_engine(args)))
        return

    import mlx_moonshine
    from mlx_moonshine.decoding import DecodingOptions

    audios = {clip: prepare_audio(Path(args.audio_dir) / clip, AudioConfig()) for clip in CLIPS}
    budgets = [DecodingOptions().token_budget(len(a) / SAMPLE_RATE) for a in audios.values()]
    results = {"machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
               "blas": mlx_moonshine._blas.describe(), "date": time.strftime("%Y-%m-%d"),
               "repeats": args.repeats, "clips": {}, "notes": []}
    for clip, a, n in zip(CLIPS, audios.values(), budgets):
        results["clips"][clip] = {"seconds": len(a) / SAMPLE_RATE, "budget": n, "engines": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for key, (cls, needs, env) in ENGINES.items():
            if importlib.util.find_spec(needs) is None:
                results["notes"].append(f"{cls.name}: skipped ({needs} not installed)")
                continue
            out = Path(tmp) / f"{key}.json"
            cmd = [sys.executable, __file__, "--engine", key, "--model", args.model, "--hf", args.hf,
                   "--audio-dir", str(args.audio_dir), "--repeats", str(args.repeats),
                   "--budgets", ",".join(map(str, budgets)), "--out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **env))
            if proc.returncode != 0:  # an engine that cannot run is reported, not fatal
                last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
                results["notes"].append(f"{cls.name}: skipped ({last})")
                continue
            res = json.loads(out.read_text())
            for clip, r in res["clips"].items():
                row = results["clips"][clip]
                row["engines"][res["name"]] = {"s": r["s"], "rtf": r["s"] / row["seconds"], "text": r["text"]}
                if "profile" in r:
                    row["profile"] = r["profile"]

    print(f"\n{results['machine']}; MLX BLAS: {results['blas']}; median of {args.repeats}; one process per engine")
    for clip, row in results["clips"].items():
        base = row["engines"]["mlx-moonshine"]["s"]
        print(f"\n{clip} ({row['seconds']:.1f} s audio, budget {row['budget']} tokens)")
        print(f"  {'engine':26s} {'seconds':>8s} {'RTF':>7s} {'vs mlx-moonshine':>17s}")
        for name, r in row["engines"].items():
            print(f"  {name:26s} {r['s']:8.3f} {r['rtf']:7.3f} {r['s'] / base:16.2f}x")
        p = row["profile"]
        print(f"  mlx-moonshine profile: encoder {p['encoder_s']:.3f} s, decoder {p['decoder_s']:.3f} s "
              f"for {p['tokens']} steps ({p['decoder_ms_per_token']:.1f} ms/token)")
        texts = {r["text"] for r in row["engines"].values()}
        if len(texts) > 1:
            print("  note: transcripts differ between engines:")
            for name, r in row["engines"].items():
                print(f"    {name}: {r['text']}")
    for note in results["notes"]:
        print("note:", note)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
