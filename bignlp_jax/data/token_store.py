"""Token store: a split of a prepared dataset tokenized once into flat, memory-mapped arrays.

Layout of a store directory (DATA_DIR/token_stores/NAME/SPLIT-TOKENIZERSHA[:16]-DATASETID[:12]):

    tokens.bin     every document as <s> ids </s>, back to back (uint16, or uint32 for
                   vocabularies over 65,536 pieces)
    offsets.npy    int64 [documents + 1]: document d is tokens[offsets[d]:offsets[d + 1]]
    manifest.json  tokenizer sha256, dataset identity, counts, sha256 of both files; written last

A store is built in a temporary directory beside its final place and renamed into it, so an
interrupted build leaves a `.tmp-*` directory (removed by the next build) and never a directory
with a manifest. Opening checks the manifest (tokenizer, dataset), the file sizes and the
offsets; the sha256 of the files is checked on first open and remembered in `verified.json`
(keyed by size and mtime), so later opens of a large store cost O(documents), not O(tokens).

Tokenizing runs in `workers` processes (spawned: the caller may hold JAX threads) over
contiguous ranges of records, each range writing its own part; the parts are concatenated in
order, so the store is the same for any number of workers.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bignlp_jax.errors import UserError

FORMAT = "bignlp_token_store/1"
TOKENS, OFFSETS, MANIFEST, VERIFIED = "tokens.bin", "offsets.npy", "manifest.json", "verified.json"
STORES_DIR = "token_stores"
# Records per encode call: big enough to amortise the call, small enough to stream.
_CHUNK = 1024


@dataclass(frozen=True)
class StoreSpec:
    """What a store is made from: a split of a prepared dataset and a tokenizer."""

    name: str
    data_dir: str
    split: str
    text_key: str
    tokenizer_path: str
    tokenizer_sha256: str

    def rebuild_command(self) -> str:
        return (f"bignlp-jax data tokenize --name {self.name} --data-dir {self.data_dir} "
                f"--tokenizer {self.tokenizer_path} --split {self.split} --text-key "
                f"{self.text_key} --overwrite")


def dataset_identity(name: str, data_dir: str | Path, split: str, text_key: str,
                     num_records: int) -> str:
    """sha256 of what identifies the dataset's content: its TFDS info (file shards, lengths),
    the split, the text key and the record count."""
    base = Path(data_dir) / name.split(":")[0]
    infos = sorted(base.glob("**/dataset_info.json"))
    h = hashlib.sha256(json.dumps([name, split, text_key, num_records]).encode())
    for info in infos:
        h.update(info.read_bytes())
    return h.hexdigest()


def store_dir(spec: StoreSpec, identity: str) -> Path:
    safe = spec.name.replace("/", "__").replace(":", "_")
    split = spec.split.replace("/", "_")
    return (Path(spec.data_dir) / STORES_DIR / safe
            / f"{split}-{spec.tokenizer_sha256[:16]}-{identity[:12]}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _with_specials(encoded: list[list[int]], bos: int, eos: int, dtype,
                   lengths: list) -> np.ndarray:
    """<s> ids </s> of every document, flat (vectorised: the ids are copied once)."""
    lens = np.asarray([len(ids) + 2 for ids in encoded], dtype=np.int64)
    ends = np.cumsum(lens)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    body = np.ones(len(flat), dtype=bool)
    body[ends - lens] = body[ends - 1] = False
    flat[ends - lens], flat[ends - 1] = bos, eos
    flat[body] = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype,
                             count=int(body.sum()))
    lengths.extend(lens.tolist())
    return flat


def _encode_range(args: tuple) -> tuple[int, int]:
    """Worker: tokenize records [lo, hi) into `part` (tokens) and `part`.len (int64 lengths)."""
    name, data_dir, split, text_key, tokenizer_path, lo, hi, part, dtype = args
    from bignlp_jax.data.tfds_source import open_split, text_of
    from bignlp_jax.data.tokenizer import load_tokenizer

    source = open_split(name, data_dir, split)
    tok = load_tokenizer(tokenizer_path)
    bos, eos = tok.bos_id, tok.eos_id
    lengths = []
    with open(part, "wb") as out:
        for a in range(lo, hi, _CHUNK):
            texts = [text_of(source[i], text_key) for i in range(a, min(hi, a + _CHUNK))]
            # one thread per worker: the workers are the parallelism (and 1 vs N is honest)
            encoded = tok.sp.encode(texts, num_threads=1)
            out.write(_with_specials(encoded, bos, eos, dtype, lengths).tobytes())
    np.asarray(lengths, dtype=np.int64).tofile(f"{part}.len")
    return hi - lo, int(sum(lengths))


def build_store(spec: StoreSpec, num_records: int, vocab_size: int, workers: int = 1,
                overwrite: bool = False, log=print) -> Path:
    """Tokenize the split into its store (atomically) unless it is there; returns its path.

    Processes sharing the data dir (the hosts of a run, a `data tokenize` beside a training
    run) take a file lock: one builds, the others then find the store."""
    identity = dataset_identity(spec.name, spec.data_dir, spec.split, spec.text_key, num_records)
    final = store_dir(spec, identity)
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / ".bignlp_store.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / MANIFEST).is_file() and not overwrite:
            return final
        return _build(spec, identity, final, num_records, vocab_size, workers, log)


def _build(spec: StoreSpec, identity: str, final: Path, num_records: int, vocab_size: int,
           workers: int, log) -> Path:
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)  # a build that was interrupted
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    start = time.perf_counter()
    try:
        workers = max(1, min(workers, num_records))
        # Several ranges per worker: documents differ in length, so equal record counts are
        # not equal work; the pool hands the next range to whichever worker is free.
        parts = 1 if workers == 1 else min(num_records, 4 * workers)
        bounds = np.linspace(0, num_records, parts + 1).astype(int)
        jobs = [(spec.name, spec.data_dir, spec.split, spec.text_key, spec.tokenizer_path,
                 int(a), int(b), str(tmp / f"part{i:05d}"), dtype)
                for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        if workers == 1:
            results = [_encode_range(jobs[0])]
        else:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                results = pool.map(_encode_range, jobs, chunksize=1)
        lengths = np.concatenate([np.fromfile(f"{j[7]}.len", dtype=np.int64) for j in jobs])
        with open(tmp / TOKENS, "wb") as out:
            for job in jobs:
                with open(job[7], "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 24)
                os.remove(job[7])
                os.remove(f"{job[7]}.len")
        seconds = time.perf_counter() - start
        manifest = _finish(tmp, lengths, {
            "dataset": spec.name, "split": spec.split, "text_key": spec.text_key,
            "dataset_identity": identity, "tokenizer_sha256": spec.tokenizer_sha256,
            "vocab_size": vocab_size, "dtype": np.dtype(dtype).name, "workers": workers,
            "build_seconds": round(seconds, 3)})
        assert sum(r[1] for r in results) == manifest["tokens"]
        tmp.chmod(0o755)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"token store: {spec.name}/{spec.split} -> {final} ({manifest['documents']} documents, "
        f"{manifest['tokens']} tokens, {seconds:.1f} s with {workers} worker(s), "
        f"{manifest['tokens'] / max(seconds, 1e-9):,.0f} tokens/s)")
    return final


def _finish(tmp: Path, lengths: np.ndarray, info: dict) -> dict:
    """Write offsets.npy and, last, the manifest (with both files' sha256) into `tmp`."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(tmp / OFFSETS, offsets)
    manifest = {"format": FORMAT, **info, "documents": int(len(lengths)),
                "tokens": int(offsets[-1]),
                "sha256": {TOKENS: _sha256(tmp / TOKENS), OFFSETS: _sha256(tmp / OFFSETS)}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    # the files were just hashed: the first open need not hash them again
    stamp = {name: [(tmp / name).stat().st_size, (tmp / name).stat().st_mtime_ns, digest]
             for name, digest in manifest["sha256"].items()}
    (tmp / VERIFIED).write_text(json.dumps(stamp))
    return manifest


def write_store(path: str | Path, documents: list, *, dataset: str, split: str,
                tokenizer_sha256: str, vocab_size: int) -> Path:
    """A store of already tokenized documents (each <s> ids </s>), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    np.concatenate([np.asarray(d, dtype) for d in documents]).tofile(tmp / TOKENS)
    _finish(tmp, np.asarray([len(d) for d in documents], np.int64), {
        "dataset": dataset, "split": split, "text_key": None, "dataset_identity": None,
        "tokenizer_sha256": tokenizer_sha256, "vocab_size": vocab_size,
        "dtype": np.dtype(dtype).name})
    os.replace(tmp, path)
    return path


class TokenStore:
    """An opened store: `tokens` (memory-mapped), `offsets`, and its `manifest`."""

    def __init__(self, path: str | Path, tokenizer_sha256: str | None = None,
                 rebuild: str = "bignlp-jax data tokenize ..."):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path, rebuild)
        ours = self.manifest.get("tokenizer_sha256")
        if tokenizer_sha256 is not None and ours != tokenizer_sha256:
            raise UserError(
                f"token store {self.path} was made with tokenizer sha256 {ours} but this run's "
                f"tokenizer has sha256 {tokenizer_sha256}; it is never read with another one\n"
                f"  fix: build the store for this tokenizer: {rebuild}")
        _verify_files(self.path, self.manifest, rebuild)
        self.tokens = np.memmap(self.path / TOKENS, dtype=self.manifest["dtype"], mode="r")
        self.offsets = np.load(self.path / OFFSETS, mmap_mode="r")
        self.identity = hashlib.sha256(
            json.dumps(self.manifest["sha256"], sort_keys=True).encode()).hexdigest()

    def __getstate__(self) -> dict:
        # Grain worker processes get the path, not a copy of the mapped arrays.
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    @property
    def num_documents(self) -> int:
        return int(self.manifest["documents"])

    def describe(self) -> dict:
        """What a run records about the store it read."""
        m = self.manifest
        return {"path": str(self.path), "identity": self.identity, "dataset": m["dataset"],
                "split": m["split"], "tokenizer_sha256": m["tokenizer_sha256"],
                "documents": m["documents"], "tokens": m["tokens"]}


def _corrupt(path: Path, problem: str, rebuild: str) -> UserError:
    return UserError(f"token store file {path} is {problem}\n"
                     f"  fix: rebuild it: {rebuild}")


def _read_manifest(path: Path, rebuild: str) -> dict:
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no token store at {path} (no {MANIFEST})\n"
                        f"  fix: build it: {rebuild}") from None
    except (OSError, ValueError) as e:
        raise _corrupt(file, f"unreadable ({type(e).__name__})", rebuild) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _corrupt(file, f"not a {FORMAT} manifest", rebuild)
    return manifest


def _verify_files(path: Path, m: dict, rebuild: str) -> None:
    """Sizes and offsets always; sha256 once per (size, mtime) of each file."""
    itemsize = np.dtype(m["dtype"]).itemsize
    expected = {TOKENS: m["tokens"] * itemsize}
    for name, size in expected.items():
        file = path / name
        if not file.is_file():
            raise _corrupt(file, "missing", rebuild)
        if file.stat().st_size != size:
            raise _corrupt(file, f"{file.stat().st_size} bytes, not the {size} its manifest "
                           "says (truncated?)", rebuild)
    try:
        offsets = np.load(path / OFFSETS, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise _corrupt(path / OFFSETS, f"unreadable ({type(e).__name__})", rebuild) from None
    if (offsets.shape != (m["documents"] + 1,) or offsets[0] != 0
            or offsets[-1] != m["tokens"] or np.any(np.diff(offsets) < 2)):
        raise _corrupt(path / OFFSETS, "inconsistent with its manifest", rebuild)
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
        if _sha256(path / name) != digest:
            raise _corrupt(path / name, "corrupt (sha256 differs from its manifest)", rebuild)
        stamp[name], changed = key, True
    if changed:
        try:  # a read-only store is fine: it is verified again next time
            tmp = stamp_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(stamp))
            os.replace(tmp, stamp_file)
        except OSError:
            pass
