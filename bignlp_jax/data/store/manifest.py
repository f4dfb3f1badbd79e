"""A token store's manifest and files: their names, and the checks opening a store runs.

`manifest.json` (written last) names the store's format, tokenizer, dataset, counts, the sha256
of `tokens.bin` and `offsets.npy`, and (newer stores) the crc32 of every chunk of the tokens.
Opening a store (token_store.py) checks the manifest, the files' sizes, the offsets and their
sha256 here; the tokens themselves are checked chunk by chunk as they are read (chunks.py), or
for an older store by their sha256 once per (size, mtime) recorded in `verified.json`. Every
problem is one `UserError` naming the file and the command that rebuilds the store.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from bignlp_jax import storage
from bignlp_jax.data.store.chunks import check_stop
from bignlp_jax.errors import UserError

FORMAT = "bignlp_token_store/1"
TOKENS, OFFSETS, MANIFEST, VERIFIED = "tokens.bin", "offsets.npy", "manifest.json", "verified.json"


def sha256_file(path: storage.AnyPath) -> str:
    """sha256 of a file, read in 16 MiB blocks; a stop request (SIGTERM) ends it promptly."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            check_stop(f"verifying token store file {path}")
            h.update(block)
    return h.hexdigest()


def corrupt(path: storage.AnyPath, problem: str, rebuild: str) -> UserError:
    return UserError(f"token store file {path} is {problem}\n"
                     f"  fix: rebuild it: {rebuild}")


def read_manifest(path: storage.AnyPath, rebuild: str, formats: tuple[str, ...]) -> dict:
    """The manifest of the store at `path`, if its format is one of `formats`; a shard's
    manifest may name only the store's own two files."""
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no token store at {path} (no {MANIFEST})\n"
                        f"  fix: build it: {rebuild}") from None
    except (OSError, ValueError) as e:  # a bucket: also permission and network errors
        raise corrupt(file, f"unreadable ({type(e).__name__})", rebuild) from None
    if not isinstance(manifest, dict) or manifest.get("format") not in formats:
        raise corrupt(file, f"not a {' or '.join(formats)} manifest", rebuild)
    if manifest["format"] == FORMAT:
        if (manifest.get("dtype") not in ("uint16", "uint32")
                or not all(isinstance(manifest.get(k), int) and manifest[k] >= 0
                           for k in ("documents", "tokens", "vocab_size"))):
            raise corrupt(file, "corrupt (its dtype or counts are not valid)", rebuild)
        named = manifest.get("sha256")
        if not isinstance(named, dict) or sorted(named) != sorted((TOKENS, OFFSETS)):
            names = sorted(named) if isinstance(named, dict) else named
            raise UserError(f"token store manifest {file} names the files {names!r}; a store "
                            f"holds exactly {TOKENS} and {OFFSETS} in its own folder, nothing "
                            f"else is read\n  fix: rebuild it: {rebuild}")
    return manifest


def check_contained(path: Path, rebuild: str) -> None:
    """The store's files must lie in its folder: a symlink out of it is refused, not read."""
    root = Path(path).resolve()
    for name in (TOKENS, OFFSETS):
        target = (Path(path) / name).resolve()
        if target.parent != root:
            raise UserError(f"token store file {Path(path) / name} leads outside its folder "
                            f"{root} (to {target}); a store's files are read only inside it\n"
                            f"  fix: rebuild it: {rebuild}")


def _check_tokens_size(path: storage.AnyPath, m: dict, rebuild: str) -> None:
    size = m["tokens"] * np.dtype(m["dtype"]).itemsize
    file = path / TOKENS
    if not file.is_file():
        raise corrupt(file, "missing", rebuild)
    if storage.size(file) != size:
        raise corrupt(file, f"{storage.size(file)} bytes, not the {size} its manifest "
                       "says (truncated?)", rebuild)


def _check_offsets(path: storage.AnyPath, offsets: np.ndarray, m: dict, rebuild: str) -> None:
    if (offsets.shape != (m["documents"] + 1,) or offsets[0] != 0
            or offsets[-1] != m["tokens"] or np.any(np.diff(offsets) < 2)):
        raise corrupt(path / OFFSETS, "inconsistent with its manifest", rebuild)


def verify_remote(path: storage.AnyPath, m: dict, rebuild: str, tokens: bool) -> np.ndarray:
    """A bucket store: sizes, the offsets (read whole: O(documents)) and their sha256; the
    tokens' sha256 only when asked (it reads every byte)."""
    _check_tokens_size(path, m, rebuild)
    try:
        data = (path / OFFSETS).read_bytes()
    except FileNotFoundError:
        raise corrupt(path / OFFSETS, "missing", rebuild) from None
    except (OSError, ValueError) as e:
        raise corrupt(path / OFFSETS, f"unreadable ({type(e).__name__})", rebuild) from None
    # the bytes first: a damaged header is never parsed
    if hashlib.sha256(data).hexdigest() != m["sha256"][OFFSETS]:
        raise corrupt(path / OFFSETS, "corrupt (sha256 differs from its manifest)", rebuild)
    offsets = np.load(io.BytesIO(data))
    _check_offsets(path, offsets, m, rebuild)
    if tokens and sha256_file(path / TOKENS) != m["sha256"][TOKENS]:
        raise corrupt(path / TOKENS, "corrupt (sha256 differs from its manifest)", rebuild)
    return offsets


def _check_chunk_table(path: Path, m: dict, rebuild: str) -> None:
    chunks = m["chunks"]
    try:
        size, crcs = int(chunks["tokens"]), chunks["crc32"]
        ok = size > 0 and isinstance(crcs, list) and len(crcs) == -(-int(m["tokens"]) // size)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise corrupt(path / MANIFEST, "inconsistent (its chunk checksums do not cover "
                       f"{TOKENS})", rebuild)


def verify_files(path: Path, m: dict, rebuild: str) -> None:
    """Sizes, offsets and the offsets' sha256 always; the tokens chunk by chunk as they are
    read, or (a store without chunk checksums) their sha256 once per (size, mtime)."""
    _check_tokens_size(path, m, rebuild)
    if m.get("chunks") is not None:  # the offsets' bytes first: a damaged header is not parsed
        _check_chunk_table(path, m, rebuild)
        try:
            data = (path / OFFSETS).read_bytes()
        except OSError as e:
            raise corrupt(path / OFFSETS, f"unreadable ({type(e).__name__})", rebuild) from None
        if hashlib.sha256(data).hexdigest() != m["sha256"][OFFSETS]:
            raise corrupt(path / OFFSETS, "corrupt (sha256 differs from its manifest)", rebuild)
    try:
        offsets = np.load(path / OFFSETS, mmap_mode="r")
    except Exception as e:  # noqa: BLE001 - numpy raises SyntaxError, TokenError, ... on a bad header
        raise corrupt(path / OFFSETS, f"unreadable ({type(e).__name__})", rebuild) from None
    _check_offsets(path, offsets, m, rebuild)
    if m.get("chunks") is not None:
        return  # the tokens are checked chunk by chunk as they are read
    stamp_file = path / VERIFIED
    try:
        stamp = json.loads(stamp_file.read_text()) if stamp_file.is_file() else {}
    except ValueError:
        stamp = {}
    changed = False
    for name, digest in m["sha256"].items():
        st = (path / name).stat()
        key = [st.st_size, st.st_mtime_ns, digest]
        if stamp.get(name) == key:
            continue
        if sha256_file(path / name) != digest:
            raise corrupt(path / name, "corrupt (sha256 differs from its manifest)", rebuild)
        stamp[name], changed = key, True
    if changed:
        try:  # a read-only store is fine: it is verified again next time
            tmp = stamp_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(stamp))
            os.replace(tmp, stamp_file)
        except OSError:
            pass
