"""Task files for the harness: the shipped offline tasks, and include dirs with local data.

The project ships three small lm-evaluation-harness tasks in configs/lm_eval/ (harness YAML,
`dataset_path: json`, JSONL data beside them), built from the embedded standard-library corpora
so they run without any download:

    bignlp_stdlib_package   multiple choice: which of 8 packages documents a docstring summary
                            (acc, acc_norm; the `stdlib_modules` validation split)
    bignlp_stdlib_ppl       rolling log-likelihood of whole documents (word_perplexity,
                            byte_perplexity, bits_per_byte; `stdlib_docs` validation)
    bignlp_stdlib_complete  generate_until: finish a docstring's first line (exact_match)

The harness opens `data_files` relative to the working directory; a task directory is more
useful if its YAMLs may name data files relative to themselves. `prepare_include_dirs` copies
each include dir's YAML files into one temporary directory with such paths made absolute (other
files are linked, so `!function` helpers still import).

`python -m bignlp_jax.evaluate.harness_tasks` rebuilds the shipped JSONL files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from bignlp_jax import storage
from bignlp_jax.data.corpora.embedded import LABELS, clean_examples
from bignlp_jax.errors import UserError

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "configs" / "lm_eval"
# Sizes of the shipped data: small enough to keep in the repository and to run in minutes.
PACKAGE_EXAMPLES, PPL_DOCUMENTS, COMPLETE_EXAMPLES = 200, 40, 100
PPL_MAX_CHARS = 1500  # a few windows per document, not the 40,000-character pydoc topics


def _absolute_data_files(value, base: Path):
    """`data_files` (a path, a list, or {split: path or list}) with relative paths under base."""
    if isinstance(value, dict):
        return {k: _absolute_data_files(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute_data_files(v, base) for v in value]
    if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
        return str(base / value)
    return value


def _resolved_yaml(path: Path) -> str | None:
    """The YAML text with relative `data_files` made absolute, or None to keep the file as is
    (no data_files, or tags such as !function that only the harness's loader reads)."""
    text = path.read_text(encoding="utf-8")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    kwargs = doc.get("dataset_kwargs") if isinstance(doc, dict) else None
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        return None
    kwargs["data_files"] = _absolute_data_files(kwargs["data_files"], path.parent)
    return yaml.safe_dump(doc, sort_keys=False)


def prepare_include_dirs(dirs: list[str | Path]) -> Path:
    """One temporary directory holding every include dir's task files (data paths resolved)."""
    out = storage.scratch_dir("bignlp_lm_eval_tasks_")
    for n, directory in enumerate(dirs):
        source = Path(directory).expanduser()
        if not source.is_dir():
            raise UserError(f"lm-eval: --include-path {directory} is not a directory\n  fix: "
                            "pass a directory of lm-evaluation-harness task YAML files")
        target = out / f"{n}_{source.name}"
        for path in sorted(source.rglob("*")):
            if not path.is_file():
                continue
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            resolved = _resolved_yaml(path) if path.suffix in (".yaml", ".yml") else None
            if resolved is not None:
                dest.write_text(resolved, encoding="utf-8")
            else:
                dest.symlink_to(path.resolve())
    return out


# --- the shipped data -------------------------------------------------------------------------

def _first_line_split(text: str) -> tuple[str, str] | None:
    """(first ~half of the first line's words, the rest of that line), or None if too short.
    The rest has no leading space: a decoded generation never starts with one."""
    words = text.split("\n", 1)[0].split(" ")
    if len(words) < 6:
        return None
    cut = len(words) // 2
    return " ".join(words[:cut]), " ".join(words[cut:])


def build_records() -> dict[str, list[dict]]:
    """{file stem: JSONL records} of the shipped tasks (a function of the Python version)."""
    modules, docs = clean_examples()
    package = [{"text": e["text"], "choices": list(LABELS), "gold": LABELS.index(e["label"])}
               for e in modules["validation"][:PACKAGE_EXAMPLES]]
    ppl = [{"text": e["text"], "source": e["source"]}
           for e in docs["validation"] if len(e["text"]) <= PPL_MAX_CHARS][:PPL_DOCUMENTS]
    complete = []
    for e in modules["validation"]:
        split = _first_line_split(e["text"])
        if split is not None:
            complete.append({"context": split[0], "target": split[1], "source": e["source"]})
        if len(complete) == COMPLETE_EXAMPLES:
            break
    return {"stdlib_package": package, "stdlib_ppl": ppl, "stdlib_complete": complete}


def write_records(out_dir: Path) -> None:
    for stem, records in build_records().items():
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (out_dir / f"{stem}.jsonl").write_text(lines, encoding="utf-8")


if __name__ == "__main__":
    write_records(SHIPPED_DIR)
    print(f"wrote {SHIPPED_DIR}")
