"""The real-speech canary: labelled recordings of real English speakers, fetched from PyPI on first use.

Synthetic held-out sets certify nothing about real voices: when the replay set and the held-out set come
from the same TTS engines, replay "improves" the held-out while real speech gets worse. So train, eval,
compare and quickstart also score a small set of *real* recordings by default, reported on its own line.

The recordings come from the source distribution of `pocketsphinx==5.1.1` (BSD-licensed test data):
  * test/data/librivox/*.wav + .txt: 5 read sentences from a public-domain LibriVox recording
    ("Sense and Sensibility", chapter 1);
  * test/data/cards/*.wav + cards.transcription: 5 short utterances of playing cards by another speaker.
All are 16 kHz mono. They are downloaded once (the sdist from the package index, `pip download` as the fallback), unpacked into the cache
($MLX_MOONSHINE_CACHE or ~/.cache/mlx-moonshine) next to a `real_canary.jsonl` manifest; no audio is
committed to this repository. Ten clips (~90 words) are a canary, not a benchmark: one word is about
one WER point, so bring real general speech of your own for decisions (`--canary MANIFEST`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, Optional

from ..errors import MoonshineError
from ..io import swap_in

POCKETSPHINX = ("pocketsphinx", "5.1.1")
CANARY_NAME = "real_canary"  # the manifest's name in eval summaries, compare and report.md
MANIFEST_FILE = f"{CANARY_NAME}.jsonl"
NO_CANARY = ("none", "off", "no", "")
CANARY_ENV = "MLX_MOONSHINE_CANARY"  # a manifest of your own real speech, or "none"; read when no --canary is given


class CanaryError(MoonshineError):
    """The real-speech canary could not be fetched or built."""


def _note(log: Optional[Callable[[str], None]], msg: str) -> None:
    if log is not None:
        log(msg)


def _cache_root(cache_dir=None) -> Path:
    from ..convert.wheels import cache_root

    return cache_root(cache_dir)


def _cards_texts(transcription: Path) -> dict[str, str]:
    """`<s> ten of clubs </s> (001)` lines -> {"001": "ten of clubs"}."""
    out = {}
    for line in transcription.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\s*(?:<s>)?\s*(.*?)\s*(?:</s>)?\s*\(([^)]+)\)\s*$", line)
        if m and m.group(1).strip():
            out[m.group(2).strip()] = " ".join(m.group(1).split())
    return out


def rows_from_sdist(data_dir: Path) -> list[dict]:
    """Manifest rows for the clips under an unpacked sdist's `test/data` (audio paths relative to it).

    Raises:
        CanaryError: the layout is not the expected one (no clip with a transcript found).
    """
    import soundfile as sf

    rows = []
    for wav in sorted((data_dir / "librivox").glob("*.wav")):
        txt = wav.with_suffix(".txt")
        if txt.is_file() and txt.read_text(encoding="utf-8").strip():
            rows.append(dict(id=f"librivox_{wav.stem.rsplit('-', 1)[-1]}", audio=f"librivox/{wav.name}",
                             text=" ".join(txt.read_text(encoding="utf-8").split()), speaker="librivox-austen"))
    cards = data_dir / "cards" / "cards.transcription"
    if cards.is_file():
        for key, text in sorted(_cards_texts(cards).items()):
            wav = data_dir / "cards" / f"{key}.wav"
            if wav.is_file():
                rows.append(dict(id=f"cards_{key}", audio=f"cards/{wav.name}", text=text, speaker="cards"))
    if not rows:
        raise CanaryError(f"{data_dir}: no librivox/*.wav+.txt or cards/*.wav+cards.transcription found; "
                          f"is it the test/data folder of {'=='.join(POCKETSPHINX)}'s sdist?")
    for r in rows:
        info = sf.info(str(data_dir / r["audio"]))
        r.update(duration=round(info.frames / info.samplerate, 3), domain="general", real=True,
                 source="=".join(POCKETSPHINX))
    return rows


def _extract_test_data(archive: Path, dest: Path) -> Path:
    """Unpack only `*/test/data/{librivox,cards}/` from the sdist into `dest`; returns dest."""
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile()
                   and re.search(r"(^|/)test/data/(librivox|cards)/[^/]+$", m.name)]
        if not members:
            raise CanaryError(f"{archive.name} holds no test/data/librivox or test/data/cards files")
        for m in members:
            rel = m.name.split("test/data/", 1)[1]
            if ".." in Path(rel).parts:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest


INDEX_URL = "https://pypi.org/simple"


def _download_sdist(tmp: Path) -> Path:
    """The sdist from the package index's simple page (sha256 checked), else through `pip download`.

    The index first: `pip download --no-binary` prepares the sdist's metadata, which builds its build
    dependencies from source (Cython: minutes of C compiles) only to throw them away.
    """
    try:
        return _fetch_from_index(tmp)
    except (OSError, ValueError, CanaryError):
        return _pip_download(tmp)


def _fetch_from_index(tmp: Path) -> Path:
    import hashlib
    import re
    import urllib.parse
    import urllib.request

    name, version = POCKETSPHINX
    index = os.environ.get("PIP_INDEX_URL", INDEX_URL).rstrip("/")
    if not index.startswith(("https://", "http://")):
        raise CanaryError(f"index {index} is not an http(s) URL")
    with urllib.request.urlopen(f"{index}/{name}/", timeout=30) as r:
        page = r.read().decode("utf-8", "replace")
    filename = f"{name}-{version}.tar.gz"
    links = [h for h in re.findall(r'href="([^"]+)"', page) if h.split("#")[0].endswith("/" + filename)]
    if not links:
        raise CanaryError(f"{filename} not on {index}/{name}/")
    url, _, fragment = links[0].partition("#")
    url = urllib.parse.urljoin(f"{index}/{name}/", url)
    with urllib.request.urlopen(url, timeout=120) as r:
        data = r.read()
    want = fragment.split("sha256=", 1)[1][:64] if "sha256=" in fragment else None
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise CanaryError(f"{filename} from {index}: sha256 mismatch")
    path = tmp / filename
    path.write_bytes(data)
    return path


def _pip_download(tmp: Path) -> Path:
    name, version = POCKETSPHINX
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
           "--disable-pip-version-check", "--timeout", "30", "--retries", "2", f"{name}=={version}",
           "--dest", str(tmp)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CanaryError(f"could not download {name}=={version} with pip ({e})") from e
    archives = list(tmp.glob(f"{name}-{version}.tar.gz")) + list(tmp.glob(f"{name}-{version}.zip"))
    if res.returncode != 0 and not archives:
        reason = next((ln.strip() for ln in reversed(res.stderr.splitlines()) if ln.strip()), "pip failed")
        raise CanaryError(f"could not download {name}=={version} with pip ({reason})")
    if len(archives) != 1:
        raise CanaryError(f"pip download {name}=={version} gave {len(archives)} source archives, expected 1")
    return archives[0]


def build_canary(cache_dir=None, archive: Optional[Path] = None, log=None) -> Path:
    """The canary manifest (cached): download the sdist (or use `archive`), unpack its clips, write the JSONL.

    Args:
        cache_dir: Cache root; default $MLX_MOONSHINE_CACHE or ~/.cache/mlx-moonshine.
        archive: A local copy of the sdist (skips the download).
        log: Optional callable receiving progress lines.

    Returns:
        Path of `real_canary.jsonl` (audio paths relative to its folder).

    Raises:
        CanaryError: no network and no cached copy, or an unexpected archive layout.
    """
    name, version = POCKETSPHINX
    folder = _cache_root(cache_dir) / f"canary-{name}-{version}"
    manifest = folder / MANIFEST_FILE
    if manifest.is_file() and (folder / ".complete").is_file():
        return manifest
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".canary-", dir=folder.parent) as tmp:
        tmp = Path(tmp)
        if archive is None:
            _note(log, f"real-speech canary: downloading {name}=={version} (sdist, test recordings) into {folder.parent}")
            archive = _download_sdist(tmp)
        staging = _extract_test_data(Path(archive), tmp / "staging")
        rows = rows_from_sdist(staging)
        (staging / MANIFEST_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (staging / ".complete").write_text(f"{Path(archive).name}\n{len(rows)} clips\n")
        os.chmod(staging, 0o755)
        swap_in(staging, folder)  # replaces an earlier, interrupted build
    _note(log, f"real-speech canary: {len(rows)} clips in {manifest}")
    return manifest


def resolve_canary(value, log=None, cache_dir=None) -> tuple[Optional[str], Optional[str]]:
    """The canary manifest a command should use: (path or None, why none).

    `value` None means $MLX_MOONSHINE_CANARY if set, else the default (the built-in real canary, fetched
    on first use); "none"/"off" turns it off; anything else is a manifest path of the user's own real general speech. A failed fetch is
    not fatal: the canary is then reported as "not measured" (and no decision can be "yes").
    """
    if value is None and os.environ.get(CANARY_ENV) is not None:
        value = os.environ[CANARY_ENV]
    if value is not None and str(value).strip().lower() in NO_CANARY:
        return None, f"turned off ({value!r})"
    if value is not None:
        return str(value), None
    try:
        return str(build_canary(cache_dir=cache_dir, log=log)), None
    except CanaryError as e:
        _note(log, f"warning: real-speech canary unavailable: {e}; it is reported as not measured")
        return None, f"unavailable ({e})"
