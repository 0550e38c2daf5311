#!/usr/bin/env python3
"""Generate the bundled ATC example: synthetic air-traffic-control radio speech + clean general English.

Every utterance is spoken by an espeak-ng voice (accent x voice variant, random rate and pitch). ATC audio
then goes through a simulated VHF AM radio channel (transmitter band-pass, fading, compressor, tanh drive
and occasional hard clipping, receiver hiss/hum at a random SNR, squelch tail, random gain); the heldout
sentences stay clean. Audio is written as Ogg/Opus (or WAV/FLAC), 16 kHz mono.

Output, all under --out (default: this script's folder); manifest "audio" paths are relative to it:

  audio/domain/{train,val,test}/<id>.ogg   audio/heldout/<id>.ogg
  domain_train.jsonl  domain_val.jsonl  domain_test.jsonl  domain_quick.jsonl  heldout_manifest.jsonl
  stats.json

With --replay / --replay-only, the general-English replay set goes to --replay-out (default:
mlx_moonshine/general_replay, the set `mlx-moonshine train` mixes in unless told otherwise):

  audio/<id>.ogg  general_replay.jsonl  replay_stats.json

Train/val/test use disjoint espeak-ng accents ("speaker_group"), so no voice is shared between splits,
and no transcript appears twice in the domain set. The quick subset is drawn from train.

  python examples/atc/make_data.py --seed 0                  # the bundled set
  python examples/atc/make_data.py --out /tmp/atc_big --n-train 2000 --n-val 200 --n-test 200
  python examples/atc/make_data.py --seed 0 --replay-only    # add the replay set, touch nothing else

The replay set (clean general English from replay_sentences.txt, mixed into every training batch by
`mlx-moonshine train` at --replay-ratio 0.3 by default) uses its own random streams and espeak-ng variants that the heldout set
never uses, so adding it changes no other file.

Needs the espeak-ng binary (apt-get install espeak-ng), numpy, scipy and soundfile (libsndfile >= 1.1
for Opus). Audio samples are identical for a given seed and espeak-ng version, whatever --jobs is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from atc_text import AIRLINES, ATC_ONLY_WORDS, STATIONS, ATCGenerator, heldout_sentences, make_waypoints, \
    text_norm, tts_text  # noqa: E402

SR = 16000  # Moonshine's input rate; everything is synthesized, filtered and stored at 16 kHz mono
SPLITS = ("train", "val", "test")

# espeak-ng voices: accent (the voice identity used for speaker-disjoint splits) x variant (timbre).
ACCENT_SPLIT = {
    "en-us": "train", "en-gb": "train", "en-gb-x-rp": "train", "en-gb-x-gbclan": "train",
    "en-gb-x-gbcwmd": "val", "en-us-nyc": "val",
    "en-gb-scotland": "test", "en-029": "test",
}
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]
# Replay voices: the same accents (espeak-ng has no other usable English ones) with timbre variants that
# no heldout/domain voice uses, so replay speakers never coincide with heldout speakers.
REPLAY_VARIANTS = ["m8", "adam", "anika", "benjamin", "david", "edward", "linda", "max", "paul", "robert",
                   "steph", "john"]
ESPEAK_WPM = 175  # espeak-ng's default speaking rate; --rate-* factors scale it

# Channel difficulty (ranges sampled uniformly per utterance). "medium" is the shared set's default.
RADIO_PROFILES = {
    # strong VHF degradation: narrow band, heavy compression/clipping, low SNR
    "hard": dict(pad=(0.08, 0.35), band_lo=(250, 450), band_hi=(2700, 3500), rx_lo=(200, 320), rx_hi=(3300, 3800),
                 fade=(0.0, 0.35), comp_thr=(0.1, 0.4), comp_ratio=(2.0, 8.0), drive=(1.0, 4.0), hard_clip_p=0.3,
                 snr=(5.0, 20.0), squelch_p=0.5, gain_db=(-14.0, -1.0)),
    "medium": dict(pad=(0.08, 0.30), band_lo=(200, 350), band_hi=(3200, 3800), rx_lo=(150, 250), rx_hi=(3600, 4000),
                   fade=(0.0, 0.25), comp_thr=(0.15, 0.5), comp_ratio=(1.5, 5.0), drive=(0.5, 2.5), hard_clip_p=0.15,
                   snr=(15.0, 30.0), squelch_p=0.4, gain_db=(-10.0, -1.0)),
    "mild": dict(pad=(0.05, 0.20), band_lo=(150, 300), band_hi=(3400, 4000), rx_lo=(100, 200), rx_hi=(3800, 4200),
                 fade=(0.0, 0.15), comp_thr=(0.2, 0.6), comp_ratio=(1.2, 3.0), drive=(0.3, 1.5), hard_clip_p=0.05,
                 snr=(15.0, 30.0), squelch_p=0.3, gain_db=(-8.0, -1.0)),
}
OUTPUT_NAMES = [f"domain_{sp}.jsonl" for sp in SPLITS] + ["domain_quick.jsonl", "heldout_manifest.jsonl",
                                                           "stats.json"]
REPLAY_NAMES = ["general_replay.jsonl", "replay_stats.json"]
REPLAY_OUT = Path(__file__).resolve().parents[2] / "mlx_moonshine" / "general_replay"
REPLAY_MAX_OVERLAP = 0.6  # word Jaccard with any heldout sentence at or above which a replay line is dropped


def stable_seed(*parts) -> int:
    """A 64-bit seed from any values, stable across runs and Python versions (unlike hash())."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")


# --------------------------------------------------------------------------------------
# Voices
# --------------------------------------------------------------------------------------
def all_voices() -> list[dict]:
    return [dict(id=f"espeak-{acc}+{var}", spec=f"{acc}+{var}", group=f"espeak-{acc}", split=sp)
            for acc, sp in ACCENT_SPLIT.items() for var in VARIANTS]


def replay_voices() -> list[dict]:
    return [dict(id=f"espeak-{acc}+{var}", spec=f"{acc}+{var}", group=f"espeak-{acc}", split="replay")
            for acc in ACCENT_SPLIT for var in REPLAY_VARIANTS]


def replay_sentences() -> list[str]:
    """replay_sentences.txt without comments and blank lines, deduplicated, in file order."""
    path = Path(__file__).with_name("replay_sentences.txt")
    lines = [s.strip() for s in path.read_text().splitlines()]
    return list(dict.fromkeys(s for s in lines if s and not s.startswith("#")))


def synth(voice: dict, text: str, rate: float, pitch: float) -> np.ndarray:
    """espeak-ng -> float32 mono at 16 kHz. rate/pitch are factors of the engine defaults."""
    with tempfile.TemporaryDirectory() as td:
        out = os.path.join(td, "out.wav")
        cmd = ["espeak-ng", "-v", voice["spec"], "-s", str(int(round(ESPEAK_WPM * rate))),
               "-p", str(int(np.clip(round(50 * pitch), 0, 99))), "-w", out, text]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if p.returncode != 0 or not os.path.exists(out) or os.path.getsize(out) < 1000:
            raise RuntimeError(f"{voice['id']} failed rc={p.returncode}: {p.stderr.strip()[-300:]}")
        y, sr = sf.read(out, dtype="float32", always_2d=True)
    y = y.mean(axis=1)
    if sr != SR:  # espeak-ng formant voices are 22.05 kHz
        g = gcd(SR, sr)
        y = signal.resample_poly(y, SR // g, sr // g).astype(np.float32)
    return y


def probe_voices(voices: list[dict]) -> list[dict]:
    """The voices espeak-ng can actually speak with (a variant file may be missing)."""
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng not found: apt-get install espeak-ng")
    ok = []
    for v in voices:
        try:
            if len(synth(v, "hello this is a voice test", 1.0, 1.0)) > SR // 2:
                ok.append(v)
        except Exception as e:  # noqa: BLE001 - report and skip the voice
            print(f"[warn] skipping {v['id']}: {e}", file=sys.stderr)
    return ok


# --------------------------------------------------------------------------------------
# Audio processing
# --------------------------------------------------------------------------------------
def trim(y: np.ndarray, top_db: float = 40.0, frame: int = 400, hop: int = 160) -> np.ndarray:
    """Cut leading/trailing silence: 25 ms frames, 10 ms hop, keep frames within top_db of the loudest."""
    if len(y) < frame:
        return y
    n = 1 + (len(y) - frame) // hop
    idx = np.arange(frame)[None, :] + hop * np.arange(n)[:, None]
    e = 10 * np.log10(np.mean(y[idx] ** 2, axis=1) + 1e-12)
    act = np.where(e > e.max() - top_db)[0]
    a = max(0, act[0] * hop - 160)
    b = min(len(y), act[-1] * hop + frame + 160)
    return y[a:b]


def pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    # 1/f filter (Kellet's 3-pole approximation); the first 1024 samples are its warm-up transient
    w = rng.standard_normal(n + 1024)
    b = [0.049922035, -0.095993537, 0.050612699, -0.004408786]
    a = [1, -2.494956002, 2.017265875, -0.522189400]
    return signal.lfilter(b, a, w)[1024:]


def radio_channel(y: np.ndarray, rng: np.random.Generator, prof: dict) -> tuple[np.ndarray, dict]:
    """Simulated VHF AM radio. All randomness comes from rng, so the output is deterministic.

    Returns:
        (audio, channel parameters drawn for this utterance).
    """
    U = lambda k: rng.uniform(*prof[k])  # noqa: E731
    y = y / (np.max(np.abs(y)) + 1e-9)
    pre, post = int(SR * U("pad")), int(SR * U("pad"))  # push-to-talk before/after speech
    n = pre + len(y) + post
    speech = np.zeros(n, np.float64)
    speech[pre:pre + len(y)] = y
    lo, hi = U("band_lo"), U("band_hi")
    sos = signal.butter(4, [lo, hi], btype="bandpass", fs=SR, output="sos")
    speech = signal.sosfilt(sos, speech)
    # slow fading (AM multipath / aircraft attitude)
    depth = U("fade")
    t = np.arange(n) / SR
    speech = speech * (1 - depth * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.3, 3.0) * t + rng.uniform(0, 6.3))))
    # compressor (one-pole envelope follower, 10 ms) + soft-clip drive + occasional hard clip
    speech = speech / (np.max(np.abs(speech)) + 1e-9)
    a = np.exp(-1 / (SR * 0.01))
    env = signal.lfilter([1 - a], [1, -a], np.abs(speech))
    thr, ratio = U("comp_thr"), U("comp_ratio")
    speech = speech * np.where(env > thr, (thr + (env - thr) / ratio) / np.maximum(env, 1e-9), 1.0)
    speech = speech / (np.max(np.abs(speech)) + 1e-9)
    drive = U("drive")
    speech = np.tanh(drive * speech) / np.tanh(drive)
    hard = bool(rng.random() < prof["hard_clip_p"])
    c = rng.uniform(0.6, 0.9)
    if hard:
        speech = np.clip(speech, -c, c) / c
    speech = signal.sosfilt(sos, speech)  # transmitter audio filter after the clipper
    # receiver noise: white/pink mix (+ occasional mains/400 Hz hum); speech and noise both pass the
    # receiver audio filter, and the SNR is measured after it over the speech region
    pink_w = rng.uniform(0, 1)
    noise = pink_w * pink_noise(rng, n) / 3.0 + (1 - pink_w) * rng.standard_normal(n)
    hum = rng.random() < 0.3
    hum_a, hum_f = rng.uniform(0.05, 0.3), rng.choice([50, 60, 400])
    if hum:
        noise = noise + hum_a * np.std(noise) * np.sin(2 * np.pi * hum_f * t)
    rx = signal.butter(6, [U("rx_lo"), U("rx_hi")], btype="bandpass", fs=SR, output="sos")
    speech = signal.sosfilt(rx, speech)
    noise = signal.sosfilt(rx, noise)
    snr = U("snr")
    p_s = np.mean(speech[pre:pre + len(y)] ** 2)
    p_n = np.mean(noise ** 2)
    noise = noise * np.sqrt(p_s / (p_n * 10 ** (snr / 10)))
    out = speech + noise
    # squelch tail: a 40-150 ms noise burst when the carrier drops
    if rng.random() < prof["squelch_p"]:
        k = int(SR * rng.uniform(0.04, 0.15))
        burst = signal.sosfilt(rx, rng.standard_normal(k)) * np.std(noise) * rng.uniform(2, 4)
        burst *= np.minimum(1.0, np.minimum(np.arange(k), np.arange(k)[::-1]) / (0.005 * SR))
        out = np.concatenate([out, burst])
    fade = int(0.005 * SR)  # 5 ms ramps: no click at either end
    out[:fade] *= np.linspace(0, 1, fade)
    out[-fade:] *= np.linspace(1, 0, fade)
    gain_db = U("gain_db")
    out = out / (np.max(np.abs(out)) + 1e-9) * 10 ** (gain_db / 20)
    return np.clip(out, -1, 1).astype(np.float32), dict(
        snr_db=round(float(snr), 2), gain_db=round(float(gain_db), 2), band_hz=[round(float(lo)), round(float(hi))],
        hard_clip=hard)


def clean_channel(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Heldout audio: 0.1-0.25 s of silence either side, peak at -6..-1 dBFS, nothing else."""
    pre = np.zeros(int(SR * rng.uniform(0.1, 0.25)), np.float32)
    post = np.zeros(int(SR * rng.uniform(0.1, 0.25)), np.float32)
    y = y / (np.max(np.abs(y)) + 1e-9) * 10 ** (rng.uniform(-6.0, -1.0) / 20)
    return np.concatenate([pre, y, post]).astype(np.float32)


def opus_compression_level(kbps: float) -> float:
    # libsndfile maps compression level 0..1 linearly onto 256..6 kbit/s per channel for Opus
    return float(np.clip(1.0 - (kbps - 6.0) / 250.0, 0.0, 1.0))


def _ogg_crc_table() -> list[int]:
    table = []
    for i in range(256):  # CRC-32, polynomial 0x04C11DB7, MSB first, as in the Ogg spec (not zlib's)
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_OGG_CRC = _ogg_crc_table()


def set_ogg_serial(data: bytes, serial: int) -> bytes:
    """Give every page of a single-stream Ogg file this stream serial number, fixing each page's CRC.

    libsndfile draws the serial at random, which would make every regenerated file differ byte-wise
    even though the audio is identical; a serial derived from the utterance id makes files reproducible.
    """
    out = bytearray(data)
    pos = 0
    while pos < len(out):
        if out[pos:pos + 4] != b"OggS":
            raise ValueError(f"not an Ogg page at byte {pos}")
        n_seg = out[pos + 26]
        size = 27 + n_seg + sum(out[pos + 27:pos + 27 + n_seg])
        out[pos + 14:pos + 18] = serial.to_bytes(4, "little")
        out[pos + 22:pos + 26] = b"\0\0\0\0"
        crc = 0
        for b in out[pos:pos + size]:
            crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[(crc >> 24) ^ b]
        out[pos + 22:pos + 26] = crc.to_bytes(4, "little")
        pos += size
    return bytes(out)


def write_audio(path: str, y: np.ndarray, fmt: str, kbps: float, serial: int) -> None:
    """Write atomically (temp file in the same folder, then rename) so a killed run leaves no torn file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        if fmt == "opus":
            sf.write(tmp, y, SR, format="OGG", subtype="OPUS", compression_level=opus_compression_level(kbps))
            with open(tmp, "rb") as f:
                data = set_ogg_serial(f.read(), serial)
            with open(tmp, "wb") as f:
                f.write(data)
        else:
            sf.write(tmp, y, SR, format=fmt.upper(), subtype="PCM_16")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# One utterance (runs in a worker process)
# --------------------------------------------------------------------------------------
def _job(job: dict) -> dict:
    rng = np.random.default_rng(job["rng_seed"])
    err = []
    for v in job["voice_chain"]:  # fall back to the next voice if espeak-ng fails on this one
        try:
            y = trim(synth(v, job["tts_text"], job["rate"], job["pitch"]))
            if len(y) < SR * 0.3:
                raise RuntimeError("too short")
            if job["domain"] == "atc":
                y, ch = radio_channel(y, rng, job["radio"])
            else:
                y, ch = clean_channel(y, rng), {}
            write_audio(os.path.join(job["out"], job["audio"]), y, job["format"], job["kbps"],
                        serial=job["rng_seed"] & 0x7FFFFFFF)
            rec = dict(id=job["id"], audio=job["audio"], text=job["text"], duration=round(len(y) / SR, 3),
                       speaker=v["id"], speaker_group=v["group"], engine="espeak-ng", split=job["split"],
                       domain=job["domain"], tts_text=job["tts_text"], rate=round(job["rate"], 3),
                       pitch=round(job["pitch"], 3), **ch)
            if v is not job["voice_chain"][0]:
                rec["fallback_from"] = job["voice_chain"][0]["id"]
            return rec
        except Exception as e:  # noqa: BLE001 - collected and reported at the end
            err.append(f"{v['id']}: {e}")
    return dict(id=job["id"], error=" | ".join(err))


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------
def make_jobs(args, pools: dict[str, list[dict]], voices: list[dict]) -> tuple[list[dict], list[str]]:
    """All utterances to synthesize: texts, voices, rates and per-utterance seeds, all drawn from --seed."""
    banned = set(ATC_ONLY_WORDS) | {w for a in AIRLINES for w in a.split()} | {s for s, _ in STATIONS}
    waypoints = make_waypoints(random.Random(stable_seed(args.seed, "wpt")), 160, banned)
    gen = ATCGenerator(random.Random(stable_seed(args.seed, "atc")), waypoints)
    radio = dict(RADIO_PROFILES[args.radio_profile])
    if args.snr:
        radio["snr"] = tuple(args.snr)
    ext = "ogg" if args.format == "opus" else args.format
    common = dict(out=args.out, format=args.format, kbps=args.kbps)

    def chain(pool: list[dict], r: random.Random) -> list[dict]:
        v = r.choice(pool)
        return [v] + [x for x in r.sample(pool, min(3, len(pool))) if x is not v][:2]

    seen: set[str] = set()
    jobs = []
    vr = random.Random(stable_seed(args.seed, "voice"))
    for split, n in (("train", args.n_train), ("val", args.n_val), ("test", args.n_test)):
        for i in range(n):
            for _ in range(1000):  # every transcript unique across the domain set
                chunks = gen.utterance()
                text = " ".join(chunks)
                if text not in seen and len(text.split()) <= args.max_words:
                    break
            seen.add(text)
            assert re.fullmatch(r"[a-z]+( [a-z]+)*", text), text
            uid = f"atc_{split}_{i:05d}"
            jobs.append(dict(id=uid, split=split, domain="atc", text=text, tts_text=tts_text(chunks, vr),
                             voice_chain=chain(pools[split], vr), rate=vr.uniform(*args.rate_domain),
                             pitch=vr.uniform(0.88, 1.12), rng_seed=stable_seed(args.seed, uid), radio=radio,
                             audio=f"audio/domain/{split}/{uid}.{ext}", **common))
    sents = heldout_sentences()
    hr = random.Random(stable_seed(args.seed, "heldout"))
    hr.shuffle(sents)
    for i in range(args.n_heldout):
        s = sents[i % len(sents)]
        uid = f"gen_heldout_{i:05d}"
        jobs.append(dict(id=uid, split="heldout", domain="general", text=text_norm(s), tts_text=s,
                         voice_chain=chain(voices, hr), rate=hr.uniform(*args.rate_heldout),
                         pitch=hr.uniform(0.92, 1.08), rng_seed=stable_seed(args.seed, uid),
                         audio=f"audio/heldout/{uid}.{ext}", **common))
    return jobs, waypoints


def make_replay_jobs(args, voices: list[dict]) -> list[dict]:
    """args.replay_voices utterances per replay sentence, each by a different accent; own seed stream."""
    ext = "ogg" if args.format == "opus" else args.format
    # heldout_sentences.txt is a superset of every heldout manifest (bundled and shared), so checking it
    # alone keeps heldout text out of training; near-copies count too (>= 60% word overlap)
    held = [set(text_norm(s).split()) for s in heldout_sentences()]
    rr = random.Random(stable_seed(args.seed, "replay"))
    by_group: dict[str, list[dict]] = {}
    for v in voices:
        by_group.setdefault(v["group"], []).append(v)
    jobs = []
    for k, s in enumerate(replay_sentences()):
        words = set(text_norm(s).split())
        if any(len(words & h) >= REPLAY_MAX_OVERLAP * len(words | h) for h in held):
            print(f"[warn] replay sentence skipped, (near-)copy of a heldout sentence: {s!r}", file=sys.stderr)
            continue
        for g in rr.sample(sorted(by_group), min(args.replay_voices, len(by_group))):
            pool = by_group[g]
            v = rr.choice(pool)
            uid = f"gen_replay_{len(jobs):05d}"
            jobs.append(dict(id=uid, split="replay", domain="general", text=text_norm(s), tts_text=s,
                             voice_chain=[v] + [x for x in rr.sample(pool, min(3, len(pool))) if x is not v][:2],
                             rate=rr.uniform(*args.rate_heldout), pitch=rr.uniform(0.92, 1.08),
                             rng_seed=stable_seed(args.seed, uid), audio=f"audio/{uid}.{ext}",
                             out=args.replay_out, format=args.format, kbps=args.kbps, sentence=k))
    return jobs


def quick_subset(train: list[dict], n: int, seed: int) -> list[dict]:
    """n train rows covering as many voice groups as possible, then random others."""
    rows = sorted(train, key=lambda r: r["id"])
    random.Random(stable_seed(seed, "quick")).shuffle(rows)
    quick, groups = [], set()
    for r in rows:
        if r["speaker_group"] not in groups and len(quick) < n:
            quick.append(r)
            groups.add(r["speaker_group"])
    quick += [r for r in rows if r not in quick][:max(0, n - len(quick))]
    return quick


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="output folder")
    ap.add_argument("--n-train", type=int, default=320)
    ap.add_argument("--n-val", type=int, default=60)
    ap.add_argument("--n-test", type=int, default=60)
    ap.add_argument("--n-heldout", type=int, default=100, help="clean general-English utterances")
    ap.add_argument("--n-quick", type=int, default=40, help="rows of train in domain_quick.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", choices=["opus", "flac", "wav"], default="opus")
    ap.add_argument("--kbps", type=float, default=16.0, help="Opus bitrate (VBR target)")
    ap.add_argument("--max-words", type=int, default=30, help="max words per ATC utterance")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--radio-profile", choices=sorted(RADIO_PROFILES), default="medium")
    ap.add_argument("--snr", type=float, nargs=2, default=None, help="override the profile's SNR range (dB)")
    ap.add_argument("--rate-domain", type=float, nargs=2, default=[1.0, 1.35], help="speaking-rate factors, ATC")
    ap.add_argument("--rate-heldout", type=float, nargs=2, default=[0.9, 1.1], help="speaking-rate factors, heldout")
    ap.add_argument("--overwrite", action="store_true", help="delete OUT/audio and the manifests first")
    ap.add_argument("--replay", action="store_true",
                    help="also write the clean general-English replay set (general_replay.jsonl, audio/) "
                         "into --replay-out")
    ap.add_argument("--replay-only", action="store_true",
                    help="write only the replay set; every other file is left as it is")
    ap.add_argument("--replay-voices", type=int, default=2, help="utterances (accents) per replay sentence")
    ap.add_argument("--replay-out", default=str(REPLAY_OUT),
                    help="folder of the replay set (default: the one mlx-moonshine train mixes in by default)")
    return ap.parse_args(argv)


def run_jobs(jobs: list[dict], n_workers: int) -> tuple[list[dict], list[str]]:
    recs, errors = [], []
    t1 = time.time()
    with ProcessPoolExecutor(max_workers=max(1, n_workers)) as ex:
        for k, rec in enumerate(ex.map(_job, jobs, chunksize=4)):
            (errors if "error" in rec else recs).append(rec)
            if (k + 1) % 50 == 0:
                print(f"[synth] {k + 1}/{len(jobs)}  {time.time() - t1:.0f}s", flush=True)
    return recs, errors


def write_replay(args, argv) -> int:
    """Synthesize the replay set into REPLAY_OUT/audio + general_replay.jsonl + replay_stats.json."""
    t0 = time.time()
    voices = probe_voices(replay_voices())
    if not voices:
        sys.exit("no usable espeak-ng replay voice")
    out = Path(args.replay_out)
    if args.overwrite:
        shutil.rmtree(out / "audio", ignore_errors=True)
        for name in REPLAY_NAMES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    jobs = make_replay_jobs(args, voices)
    recs, errors = run_jobs(jobs, args.jobs)
    atomic_write_text(str(out / "general_replay.jsonl"),
                      "".join(json.dumps(r) + "\n" for r in sorted(recs, key=lambda r: r["id"])))
    stats = dict(
        command="python examples/atc/make_data.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        seed=args.seed, format=args.format, kbps=args.kbps if args.format == "opus" else None,
        n_sentences=len({j["sentence"] for j in jobs}), n_sentences_file=len(replay_sentences()),
        voices_per_sentence=args.replay_voices,
        n_requested=len(jobs), n_written=len(recs), n_errors=len(errors), errors=errors[:20],
        hours=round(sum(r["duration"] for r in recs) / 3600, 4),
        speaker_groups=sorted({r["speaker_group"] for r in recs}), n_speakers=len({r["speaker"] for r in recs}),
        espeak_ng=subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.strip(),
    )
    atomic_write_text(str(out / "replay_stats.json"), json.dumps(stats, indent=1) + "\n")
    print(f"[replay] {len(recs)} utterances ({stats['hours'] * 60:.1f} min of audio) in {time.time() - t0:.0f}s; "
          f"errors={len(errors)}", flush=True)
    for e in errors[:10]:
        print("  [error]", e, file=sys.stderr)
    return 1 if errors else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replay_only:
        return write_replay(args, argv)
    t0 = time.time()
    voices = probe_voices(all_voices())
    pools = {sp: [v for v in voices if v["split"] == sp] for sp in SPLITS}
    if not all(pools.values()):
        sys.exit(f"every split needs a working espeak-ng voice; got {[(s, len(p)) for s, p in pools.items()]}")
    print(f"[voices] {len(voices)} usable; " + ", ".join(f"{s}: {len(p)}" for s, p in pools.items()), flush=True)
    out = Path(args.out)
    if args.overwrite:
        for sub in ("domain", "heldout"):
            shutil.rmtree(out / "audio" / sub, ignore_errors=True)
        for name in OUTPUT_NAMES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    jobs, waypoints = make_jobs(args, pools, voices)

    recs, errors = run_jobs(jobs, args.jobs)
    by_split: dict[str, list] = {}
    for r in recs:
        by_split.setdefault(r["split"], []).append(r)
    quick = quick_subset(by_split.get("train", []), args.n_quick, args.seed)

    def write(name: str, rows: list[dict]) -> None:
        atomic_write_text(str(out / name), "".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["id"])))

    for sp in SPLITS:
        write(f"domain_{sp}.jsonl", by_split.get(sp, []))
    write("domain_quick.jsonl", quick)
    write("heldout_manifest.jsonl", by_split.get("heldout", []))
    # no wall times in stats.json: regenerating with the same seed should leave the file unchanged
    stats = dict(
        command="python examples/atc/make_data.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        seed=args.seed, format=args.format, kbps=args.kbps if args.format == "opus" else None,
        radio_profile=args.radio_profile, radio_params=RADIO_PROFILES[args.radio_profile] | (
            {"snr": list(args.snr)} if args.snr else {}),
        n_requested=len(jobs), n_written=len(recs), n_errors=len(errors), errors=errors[:20],
        counts={sp: len(v) for sp, v in sorted(by_split.items())} | {"quick": len(quick)},
        hours={sp: round(sum(r["duration"] for r in v) / 3600, 4) for sp, v in sorted(by_split.items())},
        speaker_groups={sp: sorted({r["speaker_group"] for r in v}) for sp, v in sorted(by_split.items())},
        n_speakers={sp: len({r["speaker"] for r in v}) for sp, v in sorted(by_split.items())},
        espeak_ng=subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.strip(),
        waypoints=waypoints,
    )
    atomic_write_text(str(out / "stats.json"), json.dumps(stats, indent=1) + "\n")
    audio_s = sum(r["duration"] for r in recs)
    print(f"[done] {len(recs)} utterances ({audio_s / 60:.1f} min of audio) in {time.time() - t0:.0f}s; "
          f"errors={len(errors)}; counts={stats['counts']}", flush=True)
    for e in errors[:10]:
        print("  [error]", e, file=sys.stderr)
    rc = 1 if errors else 0
    if args.replay:
        rc = max(rc, write_replay(args, argv))
    return rc


if __name__ == "__main__":
    sys.exit(main())
