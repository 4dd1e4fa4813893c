"""Where a pretrained model comes from, resolved to one Hugging Face model directory.

    directory, identity = pretrained_directory("smollm2-135m-instruct", converted_root=workdir / "models")

A model source is, in this order:
- a registered asset (`jaxcollab.assets`, e.g. `smollm2-135m-instruct`): its verified GGUF file;
- an existing Hugging Face model directory;
- a `.gguf` file;
- a Hugging Face Hub id (`organisation/name`), fetched with `assets.hub_snapshot`.
A GGUF file is converted (`jaxcollab.convert.convert_gguf`, float32) into
`converted_root/base-gguf-<first 12 hex digits of its sha256>`, once: a directory already there is reused.
`identity` names what was loaded (asset and sha256, path, GGUF path and sha256, or hub id), for provenance
and cache keys. The launcher (`model.path`) and `python -m jaxcollab.old_knowledge --model` take the same
sources.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from jaxcollab import assets

__all__ = ["PretrainedSourceError", "converted_gguf_directory", "pretrained_directory"]

logger = logging.getLogger(__name__)

HUB_ID_PATTERN = r"[A-Za-z0-9][\w.-]*/[\w.-]+"


class PretrainedSourceError(ValueError):
    """A model source that is none of an asset, a model directory, a GGUF file or a hub id."""


def converted_gguf_directory(source: Path, digest: str, converted_root: Path, *, convert: bool = True,
                             progress: bool = True) -> Path:
    """The HF directory converted from GGUF file `source` (sha256 `digest`) under `converted_root`, converted
    now unless it is there already. convert=False only names the directory (another process converts it)."""
    from jaxcollab.convert import convert_gguf

    out = Path(converted_root) / f"base-gguf-{digest[:12]}"
    if convert and not (out / "config.json").is_file():
        logger.warning("converting %s into %s (once)", source, out)
        convert_gguf(source, out, dtype="float32", overwrite=True, progress=progress)
    return out


def pretrained_directory(spec: str, converted_root: str | Path, *, convert: bool = True,
                         progress: bool = True) -> tuple[Path, dict]:
    """(Hugging Face directory, identity) of the model source `spec` (see the module docstring)."""
    spec = str(spec).strip()
    converted_root = Path(converted_root)
    if assets.is_asset(spec):
        asset = assets.get_asset(spec)
        source = assets.resolve(spec)
        return (converted_gguf_directory(source, asset.sha256, converted_root, convert=convert, progress=progress),
                {"asset": spec, "sha256": asset.sha256})
    path = Path(spec).expanduser()
    if path.is_dir():
        return path, {"path": str(path.resolve())}
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise PretrainedSourceError(f"{spec!r} is a file but not a .gguf file; name a GGUF file, a Hugging Face"
                                        " model directory, an asset or a hub id")
        digest = assets.sha256_file(path)
        return (converted_gguf_directory(path, digest, converted_root, convert=convert, progress=progress),
                {"gguf": str(path.resolve()), "sha256": digest})
    if re.fullmatch(HUB_ID_PATTERN, spec):
        return assets.hub_snapshot(spec), {"hub": spec}
    known = ", ".join(a.name for a in assets.list_assets())
    raise PretrainedSourceError(f"{spec!r} is neither an asset ({known}), an existing directory or .gguf file, nor a"
                                " hub id (organisation/name)")
