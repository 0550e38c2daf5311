"""The real-speech canary builder, on a tiny fake sdist laid out like pocketsphinx 5.1.1's (no download)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mlx_moonshine.eval import canary
from mlx_moonshine.data import load_manifest


def _wav_bytes(seconds: float, seed: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32),
             16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def fake_sdist(path: Path, cards: bool = True, librivox: bool = True) -> Path:
    files = {"pocketsphinx-5.1.1/README.md": b"not audio", "pocketsphinx-5.1.1/test/data/goforward.raw": b"\0" * 64}
    if librivox:
        for i, (key, text) in enumerate([("0870", "and mister john dashwood had then leisure"),
                                         ("0880", "  he was not an ill disposed young man\n")]):
            stem = f"pocketsphinx-5.1.1/test/data/librivox/sense_and_sensibility_01_austen_64kb-{key}"
            files[stem + ".wav"] = _wav_bytes(1.0 + i, i)
            files[stem + ".txt"] = text.encode()
            files[stem + ".json"] = b"{}"  # alignment files the builder must ignore
    if cards:
        for key in ("001", "002"):
            files[f"pocketsphinx-5.1.1/test/data/cards/{key}.wav"] = _wav_bytes(0.8, int(key))
        files["pocketsphinx-5.1.1/test/data/cards/cards.transcription"] = (
            b"<s> ten of clubs  </s> (001)\n<s> four queen of clubs  </s> (002)\n<s> seven </s> (009)\n")
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_builds_a_manifest_of_every_labelled_clip_and_caches_it(tmp_path):
    archive = fake_sdist(tmp_path / "pocketsphinx-5.1.1.tar.gz")
    path = canary.build_canary(cache_dir=tmp_path / "cache", archive=archive)
    m = load_manifest(path)
    texts = {s.id: s.text for s in m.samples}
    assert texts == {"librivox_0870": "and mister john dashwood had then leisure",
                     "librivox_0880": "he was not an ill disposed young man",
                     "cards_001": "ten of clubs", "cards_002": "four queen of clubs"}  # 009 has no wav: left out
    assert all(s.audio_path.is_file() and s.duration > 0 for s in m.samples)
    assert path.stem == canary.CANARY_NAME
    # Cached: no archive needed the second time (a download would fail here), the same file back.
    assert canary.build_canary(cache_dir=tmp_path / "cache", archive=tmp_path / "absent.tar.gz") == path


def test_unexpected_layout_is_a_clear_error(tmp_path):
    archive = fake_sdist(tmp_path / "p.tar.gz", cards=False, librivox=False)
    with pytest.raises(canary.CanaryError, match="no test/data/librivox or test/data/cards"):
        canary.build_canary(cache_dir=tmp_path / "cache", archive=archive)
    assert not (tmp_path / "cache" / "canary-pocketsphinx-5.1.1").exists()  # nothing half-built left behind


def test_resolve_canary_default_off_and_own_set(tmp_path, monkeypatch):
    monkeypatch.delenv(canary.CANARY_ENV, raising=False)
    assert canary.resolve_canary("none") == (None, "turned off ('none')")
    assert canary.resolve_canary(str(tmp_path / "mine.jsonl"))[0] == str(tmp_path / "mine.jsonl")
    monkeypatch.setenv(canary.CANARY_ENV, str(tmp_path / "env.jsonl"))
    assert canary.resolve_canary(None)[0] == str(tmp_path / "env.jsonl")
    # The default with no network and no cache: not fatal, reported as unavailable (-> "not measured").
    monkeypatch.delenv(canary.CANARY_ENV)

    def offline(tmp):
        raise canary.CanaryError("could not download pocketsphinx==5.1.1 with pip (offline)")

    monkeypatch.setattr(canary, "_download_sdist", offline)
    path, why = canary.resolve_canary(None, cache_dir=tmp_path / "empty-cache")
    assert path is None and "unavailable" in why and "offline" in why


def _serve(folder: Path):
    """A local package index (PEP 503 simple layout) over http, in a thread."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("good_hash", [True, False])
def test_fetches_the_sdist_from_the_index_and_checks_its_sha256(tmp_path, monkeypatch, good_hash):
    """The download reads the index's simple page (no pip, so no build of the sdist's build deps)."""
    import hashlib

    root = tmp_path / "index"
    (root / "simple" / "pocketsphinx").mkdir(parents=True)
    archive = fake_sdist(root / "pocketsphinx-5.1.1.tar.gz")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest() if good_hash else "0" * 64
    (root / "simple" / "pocketsphinx" / "index.html").write_text(
        f'<a href="../../pocketsphinx-5.1.1.tar.gz#sha256={digest}">pocketsphinx-5.1.1.tar.gz</a>\n'
        '<a href="../../pocketsphinx-5.1.0.tar.gz#sha256=00">pocketsphinx-5.1.0.tar.gz</a>\n')
    server = _serve(root)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}/simple")
    pip_calls = []
    monkeypatch.setattr(canary, "_pip_download", lambda tmp: pip_calls.append(tmp) or (_ for _ in ()).throw(
        canary.CanaryError("pip fallback")))
    try:
        if good_hash:
            path = canary.build_canary(cache_dir=tmp_path / "cache")
            assert len(load_manifest(path).samples) == 4 and not pip_calls
        else:  # a damaged download is not used: the pip fallback is tried instead
            with pytest.raises(canary.CanaryError, match="pip fallback"):
                canary.build_canary(cache_dir=tmp_path / "cache")
            assert len(pip_calls) == 1
    finally:
        server.shutdown()
