"""Token stores in a bucket (gs://, s3://): read by byte ranges, published whole.

A host of a TPU pod must not copy a multi-terabyte corpus before it trains, and it reads only
its own rows of each batch. `RemoteTokens` therefore stands in for the memory-mapped
`tokens.bin` of a local store: every batch asks for the token ranges of its document pieces,
and those ranges are fetched with one `cat_ranges` call of the bucket's fsspec filesystem
(gcsfs / s3fs issue the ranged GETs concurrently). Nearby ranges are merged, so a batch costs
a few requests, not one per row; the Grain loader's prefetch threads (`data.worker_threads`)
overlap them with training. The bytes read are the bytes a local store would map, so batches
are bitwise the same.

`publish_store` uploads a store built in a local staging directory, manifest last: a reader
never finds a manifest whose files are not all there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bignlp_jax import outage, storage
from bignlp_jax.errors import UserError

# Ranges closer than this many bytes are fetched as one: reading up to 64 KiB more (under 1 ms
# at 100 MB/s) costs less than another request (an HTTP round trip, and ~0.5 ms of CPU each
# through gcsfs: benchmarks/remote_store.py).
MERGE_GAP_BYTES = 64 * 1024


class RemoteTokens:
    """`tokens.bin` of a store in a bucket: `dtype`, `len`, slices, and `pairs(idx)`."""

    def __init__(self, url: str, dtype: str, length: int, rebuild: str):
        self.url, self.dtype, self.length, self.rebuild = url, np.dtype(dtype), length, rebuild
        self._fs = None
        self._key = ""

    def __getstate__(self) -> dict:  # Grain worker processes make their own filesystem
        return {**self.__dict__, "_fs": None}

    def __len__(self) -> int:
        return self.length

    @property
    def shape(self) -> tuple[int]:
        return (self.length,)

    def _filesystem(self):
        if self._fs is None:
            import fsspec.core  # bucket stores only

            storage.path(self.url)  # the missing-extra error, and fsspec's cache settings
            self._fs, self._key = fsspec.core.url_to_fs(self.url)
        return self._fs

    def _read(self, starts: np.ndarray, ends: np.ndarray) -> list[bytes]:
        """Bytes of the token ranges [starts[i], ends[i]) (in tokens), fetched concurrently."""
        size = self.dtype.itemsize
        fs = self._filesystem()
        try:
            with outage.bounded("reading the token store", self.url):
                blobs = fs.cat_ranges([self._key] * len(starts), (starts * size).tolist(),
                                      (ends * size).tolist())
        except (OSError, ValueError) as e:  # FileNotFoundError, PermissionError, network
            raise self._unreadable(e) from None
        for blob, a, b in zip(blobs, starts, ends):
            if isinstance(blob, Exception):  # cat_ranges returns a failed range's error
                raise self._unreadable(blob)
            if len(blob) != (b - a) * size:
                raise UserError(f"token store file {self.url} is shorter than its manifest "
                                f"says (truncated?)\n  fix: rebuild it: {self.rebuild}")
        return blobs

    def _unreadable(self, error: BaseException) -> UserError:
        return UserError(f"token store file {self.url} could not be read: "
                         f"{type(error).__name__}: {str(error).splitlines()[0][:200]}\n"
                         f"  fix: check access to the bucket, or rebuild it: {self.rebuild}")

    def __getitem__(self, key: slice) -> np.ndarray:
        """tokens[a:b] (step 1 only: what readers of a store use besides `pairs`)."""
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("RemoteTokens supports contiguous slices and pairs(idx) only")
        a, b, _ = key.indices(self.length)
        if b <= a:
            return np.empty(0, self.dtype)
        blob = self._read(np.array([a]), np.array([b]))[0]
        return np.frombuffer(blob, self.dtype)

    def pairs(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens[idx], tokens[idx + 1]) with one round of ranged reads.

        `idx` holds the positions of a batch's inputs: runs of consecutive positions (one per
        document piece). Each run is read with one extra token (its last target); runs closer
        than MERGE_GAP_BYTES are merged into one request."""
        flat = np.asarray(idx, dtype=np.int64).ravel()
        if flat.size == 0:
            empty = np.empty(idx.shape, self.dtype)
            return empty, empty.copy()
        wanted = np.unique(flat)  # sorted
        gap = MERGE_GAP_BYTES // self.dtype.itemsize  # tokens a merge may read needlessly
        cut = np.flatnonzero(np.diff(wanted) > gap + 1) + 1  # where a new request starts
        starts = wanted[np.concatenate([[0], cut])]
        ends = np.minimum(wanted[np.concatenate([cut - 1, [len(wanted) - 1]])] + 2, self.length)
        blobs = self._read(starts, ends)
        buffer = np.frombuffer(b"".join(blobs), self.dtype)
        base = np.concatenate([[0], np.cumsum(ends - starts)[:-1]])  # each range in `buffer`
        which = np.searchsorted(starts, flat, side="right") - 1
        pos = base[which] + (flat - starts[which])
        return buffer[pos].reshape(idx.shape), buffer[pos + 1].reshape(idx.shape)


def publish_store(staged: Path, remote: storage.AnyPath, manifest: str) -> None:
    """Upload the store built in local directory `staged` to bucket path `remote`, replacing an
    earlier one: its manifest is deleted first and the new one uploaded last, so a store that
    looks complete (has a manifest) is never half old, half new, nor half uploaded."""
    if (remote / manifest).exists():
        (remote / manifest).unlink()
    if remote.exists():
        storage.rmtree(remote)
    files = sorted(f for f in staged.rglob("*") if f.is_file())  # shards: in their folders
    for file in sorted(files, key=lambda f: f == staged / manifest):  # the manifest last
        storage.copy_file(file, remote.joinpath(*file.relative_to(staged).parts))
