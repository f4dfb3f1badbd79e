"""The local tier's array format: each process's own shards as raw files, read back in one copy.

A local step's `state/` holds only this process's shards (local_tier.py), on this process's
mesh layout, so it needs none of what makes Orbax's format general (resharding, merged OCDBT
manifests, zarr chunk grids). Layout:

    state/shards.json             format tag; per leaf its tree path, shape, dtype and, per
                                  distinct shard this process holds, the shard's index and file
    state/shards/<n>              one shard's bytes, C order (no header, no compression)
    state/checksums.primary.json  CRC-32C and size of every file above (integrity.py's format)

Saving is an Orbax checkpoint handler: the step still goes through Orbax's CheckpointManager
(temporary directory renamed into place when complete, retention, the background thread);
the arrays leave the devices as Orbax's own handler takes them (`np.asarray` of each shard,
zero-copy on CPU) and are checksummed from memory while written. Restoring reads each file
straight into an aligned buffer (`_buffer`) that `jax.device_put` adopts without copying on
CPU: one copy from the page cache, where Orbax's reader makes three (TensorStore's read buffer,
the `np.zeros` shard it fills, and the device buffer `device_put` copies it into). A resume
sums each file's checksum from those same bytes as they arrive: no separate verify read.

Why not Orbax for this tier: with Orbax's own reader the local tier restored only about 2x
faster than the durable one, and none of its options (TensorStore's file_io / data_copy
concurrency, plain zarr instead of OCDBT, restore_concurrent_gb) moved it: the time is the
copies and the fresh memory each one faults in. These files restore several times faster with
their checksums verified (benchmarks/RESULTS.md, "Local fast tier vs durable tier", has the
measurements).
"""

from __future__ import annotations

import dataclasses
import json
import mmap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bignlp_jax import storage
from bignlp_jax.checkpoint import checksum_writer, integrity
from bignlp_jax.checkpoint.paths import SHARD_INDEX as INDEX
from bignlp_jax.checkpoint.read_errors import DamagedCheckpoint
from bignlp_jax.compat import orbax as orbax_compat

FORMAT = "bignlp-shard-files-1"
SHARDS = "shards"
ALIGN = 64  # XLA's CPU client adopts a host buffer this aligned instead of copying it
READERS = 2  # threads reading files: the copy out of the page cache runs in the kernel
CRC_CHUNK = integrity.CHUNK  # google_crc32c holds the GIL on arrays: checksum in pieces


def _index(index: tuple, shape: tuple[int, ...]) -> list[list[int]]:
    """A shard's index (slices) as [[start, stop], ...] over the whole shape."""
    return [list(s.indices(n)[:2]) for s, n in zip(index, shape, strict=True)]


def _host_shards(leaf: Any) -> list[tuple[list[list[int]], Any]]:
    """The distinct shards of `leaf` this process holds: (index, array still on its device)."""
    if not isinstance(leaf, jax.Array):
        value = np.asarray(leaf)
        return [([[0, n] for n in value.shape], value)]
    distinct: dict[str, tuple[list[list[int]], Any]] = {}
    for shard in leaf.addressable_shards:
        index = _index(shard.index, leaf.shape)
        distinct.setdefault(json.dumps(index), (index, shard.data))
    return list(distinct.values())


def _extend(crc: int, data: np.ndarray) -> int:
    view = data.reshape(-1).view(np.uint8)
    view.flags.writeable = False  # the C extension takes read-only buffers only
    return google_crc32c.extend(crc, view)


def _crc(data: np.ndarray) -> int:
    flat = data.reshape(-1).view(np.uint8)
    crc = 0
    for start in range(0, flat.size, CRC_CHUNK):
        crc = _extend(crc, flat[start:start + CRC_CHUNK])
    return crc


class ShardFilesHandler(ocp.handlers.AsyncCheckpointHandler):
    """Saves a PyTree of arrays as this process's shard files (see the module docstring)."""

    async def async_save(self, directory, args: ShardFilesSave):
        leaves = [(path, leaf, _host_shards(leaf))
                  for path, leaf in jax.tree_util.tree_flatten_with_path(args.item)[0]]
        for _, _, held in leaves:  # every transfer in flight before the first wait
            for _, data in held:
                if isinstance(data, jax.Array):
                    data.copy_to_host_async()
        entries: list[dict] = []
        shards: list[np.ndarray] = []
        for path, leaf, held in leaves:
            files = []
            for index, data in held:
                files.append({"index": index, "file": f"{SHARDS}/{len(shards)}"})
                # on CPU a view of the device buffer (as Orbax's handler takes it), elsewhere
                # the host copy; the write happens in the background
                shards.append(np.ascontiguousarray(np.asarray(data)))
            entries.append({"path": jax.tree_util.keystr(path), "shape": list(np.shape(leaf)),
                            "dtype": str(held[0][1].dtype), "shards": files})
        return [ocp.future.CommitFutureAwaitingContractedSignals(
            self._write(storage.path(str(directory)), entries, shards), name="shard_files")]

    async def _write(self, state_dir: Path, entries: list[dict], shards: list) -> None:
        (state_dir / SHARDS).mkdir(parents=True, exist_ok=True)
        sums = {}
        for n, data in enumerate(shards):
            name = f"{SHARDS}/{n}"
            with open(state_dir / name, "wb") as f:
                f.write(data.reshape(-1).view(np.uint8).data)
            sums[name] = (data.nbytes, _crc(data))
        index = json.dumps({"format": FORMAT, "leaves": entries}).encode()
        (state_dir / INDEX).write_bytes(index)
        sums[INDEX] = (len(index), google_crc32c.value(index))
        checksum_writer.write_listing(state_dir, sums, jax.process_count(), processes=[])

    def finalize(self, directory) -> None:
        # the step's data position and metadata are written by now: add their sums
        checksum_writer.add_step_items(storage.path(str(directory)))

    def save(self, directory, args: ShardFilesSave) -> None:
        for f in orbax_compat.run_sync(self.async_save(directory, args)):
            f.result()

    def restore(self, directory, args: ShardFilesRestore) -> Any:
        return read_tree(storage.path(str(directory)), args.target)

    def metadata(self, directory) -> None:
        return None


@ocp.args.register_with_handler(ShardFilesHandler, for_save=True)
@dataclasses.dataclass
class ShardFilesSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(ShardFilesHandler, for_restore=True)
@dataclasses.dataclass
class ShardFilesRestore(ocp.args.CheckpointArgs):
    target: Any


def _buffer(nbytes: int) -> np.ndarray:
    """A fresh writable buffer XLA can adopt (aligned). Large ones are anonymous mappings, not
    numpy's allocations: numpy advises huge pages for those, and with transparent huge pages
    in "madvise" mode the kernel then compacts memory synchronously as the pages are first
    touched, which right after a durable restore had freed its buffers made reading 1.4 GiB
    take 1.2-2.9 s instead of 0.6 (0.7-1.1 s with plain pages; measured, interleaved)."""
    if nbytes >= 2**20:
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS),
                             np.uint8)
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes]


def _read(state_dir: Path, name: str, nbytes: int,
          recorded: tuple[int, int] | None) -> np.ndarray:
    """The file's bytes in a fresh aligned buffer; OSError/ValueError if it cannot be read
    whole or, with `recorded` (size, crc), fails its checksum: the bytes are summed piece by
    piece as they arrive, while still in the cache (read_errors.py counts both as damage)."""
    buffer = _buffer(nbytes)
    done, crc = 0, 0
    with open(state_dir / name, "rb", buffering=0) as f:
        while done < nbytes and (got := f.readinto(buffer[done:done + CRC_CHUNK].data)):
            if recorded is not None:
                crc = _extend(crc, buffer[done:done + got])
            done += got
        extra = f.read(1)
    if done != nbytes or extra:
        held = done if done < nbytes else f"more than {done}"
        raise DamagedCheckpoint(f"state/{name} holds {held} bytes; the checkpoint's index says "
                                f"{nbytes}")
    if recorded is not None and recorded != (nbytes, crc):
        raise DamagedCheckpoint(f"state/{name} fails its checksum (crc32c {crc:08x}, recorded at "
                                f"save {recorded[1]:08x}): the file changed after it was written")
    return buffer


def read_tree(state_dir: Path, target: Any, verify: bool = False) -> Any:
    """The arrays of `target` (ShapeDtypeStructs with this layout's shardings) from this
    process's shard files; keys the target leaves out are not read. `verify`: check every
    file read against the step's checksums, from the bytes loaded (no second read), raising
    ValueError naming the first that fails (as integrity.verify words it)."""
    sums: dict[str, tuple[int, int]] = {}
    if verify and (listing := integrity.read_listing(state_dir)) is not None:
        if listing.problem:
            raise DamagedCheckpoint(listing.problem)
        sums = listing.files
    try:
        raw = (state_dir / INDEX).read_bytes()
        if sums and sums.get(INDEX) != (len(raw), google_crc32c.value(raw)):
            raise DamagedCheckpoint(f"state/{INDEX} fails its checksum: the file changed after it "
                             "was written")
        index = json.loads(raw)
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"cannot read {state_dir / INDEX}: {e}") from e
    if index.get("format") != FORMAT:
        raise DamagedCheckpoint(f"{state_dir / INDEX} is not a {FORMAT} index")
    saved = {leaf["path"]: leaf for leaf in index["leaves"]}
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(target)[0], strict=True)
    jobs = []  # (leaf number, device(s), file, shard shape, saved dtype)
    for n, (path, leaf) in enumerate(zip(paths, leaves, strict=True)):
        entry = saved.get(jax.tree_util.keystr(path))
        if entry is None or tuple(entry["shape"]) != tuple(leaf.shape):
            raise DamagedCheckpoint(f"{state_dir} holds no array {jax.tree_util.keystr(path)} "
                                    f"of shape {tuple(leaf.shape)}")
        files = {json.dumps(s["index"]): s["file"] for s in entry["shards"]}
        by_index: dict[str, list] = {}
        for device, idx in leaf.sharding.addressable_devices_indices_map(leaf.shape).items():
            by_index.setdefault(json.dumps(_index(idx, leaf.shape)), []).append(device)
        for key, devices in by_index.items():
            if key not in files:
                raise DamagedCheckpoint(f"{state_dir} holds no shard {key} of "
                                 f"{jax.tree_util.keystr(path)}")
            shape = tuple(b - a for a, b in json.loads(key))
            jobs.append((n, devices, files[key], shape, jnp.dtype(entry["dtype"])))

    def load(job) -> list[jax.Array]:
        n, devices, name, shape, dtype = job
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if sums and name not in sums:
            raise DamagedCheckpoint(f"state/{name} is not in the step's checksums")
        host = _read(state_dir, name, nbytes, sums.get(name) if sums else None)
        host = host.view(dtype).reshape(shape)
        if dtype != leaves[n].dtype:
            host = host.astype(leaves[n].dtype)
        # the first device adopts the buffer; replicas get device-to-device copies (on CPU
        # `device_put` of the same aligned host buffer would alias it again, whatever
        # `may_alias` says, and a donated replica is overwritten in place)
        first = jax.device_put(host, devices[0], may_alias=True)
        return [first] + [jax.device_put(first, d) for d in devices[1:]]

    per_leaf: list[list[jax.Array]] = [[] for _ in leaves]
    with ThreadPoolExecutor(READERS) as pool:
        for job, arrays in zip(jobs, pool.map(load, jobs), strict=True):
            per_leaf[job[0]].extend(arrays)
    restored = [jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, arrays)
                for leaf, arrays in zip(leaves, per_leaf, strict=True)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), restored)
