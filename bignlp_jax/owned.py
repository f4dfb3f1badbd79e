"""We only replace what we wrote: a ledger file in each output directory lists our files.

`.bignlp-written.json` names the files (or top-level entries) a command of ours wrote into a
directory. It is how a directory is recognised as ours, never by a file name the user could
have too (`config.json`, `report.md`):

- whole-directory outputs (`export`, `import`): `check_replaceable` lets a command write into a
  new or empty directory, or replace one that holds exactly an earlier output of ours (every
  file listed) when `--overwrite` is given; otherwise it refuses, naming what is there. `seal`
  writes the ledger of a finished output (last, so a cut-short output has none).
- shared directories (a pipeline's `output_dir`): `claim` refuses to write names that exist
  and are not ours, and records the new ones; other files there are never touched.

Works for local and bucket paths.
"""

from __future__ import annotations

import json
import os

from bignlp_jax import storage
from bignlp_jax.errors import UserError

LEDGER = ".bignlp-written.json"
_SHOWN = 5  # names listed in a refusal


def _names(paths: list[str]) -> str:
    more = f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else ""
    return ", ".join(paths[:_SHOWN]) + more


def read_ledger(folder: str | os.PathLike) -> list[str] | None:
    """The names our ledger in `folder` lists, or None when there is none (or it is damaged)."""
    path = storage.path(folder) / LEDGER
    try:
        names = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else None


def _write_ledger(folder: str | os.PathLike, names: list[str]) -> None:
    text = json.dumps({"written_by": "bignlp-jax", "files": sorted(set(names))}, indent=1)
    (storage.path(folder) / LEDGER).write_text(text + "\n", encoding="utf-8")


def _files(folder: storage.AnyPath) -> list[str]:
    base = str(folder).rstrip("/") + "/"
    return sorted(str(f)[len(base):] for f in storage.files_under(folder))


def check_replaceable(out: str | os.PathLike, overwrite: bool, flag: str = "--out") -> bool:
    """Refuse (UserError, one line) unless `out` is new, empty, or exactly an earlier output of
    ours and `overwrite` is set. Returns whether something is there to replace."""
    target = storage.path(out)
    if not target.exists():
        return False
    if not target.is_dir():
        raise UserError(f"{flag} {out} is a file, not a directory; choose a new directory")
    present = [f for f in _files(target) if f != LEDGER]
    if not present and not any(target.iterdir()):
        return False
    listed = read_ledger(target)
    if listed is None:
        raise UserError(f"{flag} {out} holds files no export of ours wrote ({_names(present)}); "
                        "nothing was changed: choose a new or empty directory")
    foreign = sorted(set(present) - set(listed))
    if foreign:
        raise UserError(f"{flag} {out} holds an earlier export plus files it did not write "
                        f"({_names(foreign)}); nothing was changed: move them out or choose "
                        "another directory")
    if not overwrite:
        raise UserError(f"{flag} {out} holds an earlier export; add --overwrite to replace it, "
                        "or choose another directory")
    return True


def seal(folder: str | os.PathLike) -> None:
    """Write the ledger of a finished output: every file now in `folder` is ours."""
    _write_ledger(folder, _files(storage.path(folder)))


def claim(folder: str | os.PathLike, names: list[str], what: str, record: bool = True) -> None:
    """Before a command writes the top-level `names` into shared `folder` (`what`, e.g.
    "output_dir"): refuse those that exist and are not ours; record the rest as ours (unless
    `record` is off: the other processes of a job only check)."""
    base = storage.path(folder)
    listed = read_ledger(folder) or []
    foreign = [n for n in names if n not in listed and (base / n).exists()]
    if foreign:
        raise UserError(f"{what} {folder} already holds {_names(foreign)}, which this command "
                        "did not write and would replace; nothing was changed: move them out "
                        f"or choose another {what}")
    if record and set(names) - set(listed):
        base.mkdir(parents=True, exist_ok=True)
        _write_ledger(folder, [*listed, *names])
