"""Real text every Python installation carries: pydoc topics and standard-library docstrings.

Everything is collected in sorted order (modules, members, topics) and keyed by name, so the same
Python minor version on the same OS gives the same documents on every machine. Modules that fail
to import (platform-specific ones such as `asyncio.windows_events`) are skipped; private
(`_name`) and test modules are left out.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import warnings
from collections.abc import Iterator
from types import ModuleType

# Packages whose docstrings form the classification task; the label is the package name.
LABEL_PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "unittest", "urllib", "xml")

# Extra pure-Python modules and packages for the pretraining text (present in every CPython).
PRETRAIN_MODULES = LABEL_PACKAGES + (
    "abc", "argparse", "ast", "base64", "bdb", "bisect", "calendar", "cmd", "code", "codecs",
    "collections", "concurrent", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "doctest", "enum", "filecmp", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
    "hashlib", "heapq", "hmac", "html", "imaplib", "inspect", "ipaddress", "json", "locale",
    "mailbox", "mimetypes", "multiprocessing", "netrc", "numbers", "operator", "optparse",
    "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "profile", "pstats", "queue", "quopri", "random", "re", "reprlib", "runpy", "sched",
    "secrets", "selectors", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "traceback", "types", "typing", "uuid", "warnings",
    "weakref", "wsgiref", "xmlrpc", "zipfile", "zipimport",
)
MIN_DOC_CHARS = 40


def _import(name: str) -> ModuleType | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - platform-specific or optional modules
        return None


def package_modules(name: str) -> list[ModuleType]:
    """The module `name` and, for a package, its public submodules (recursively, sorted)."""
    root = _import(name)
    if root is None:
        return []
    modules = [root]
    if hasattr(root, "__path__"):
        for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda i: i.name):
            if info.name.startswith("_") or "test" in info.name:
                continue
            modules.extend(package_modules(f"{name}.{info.name}"))
    return modules


def module_docstrings(module: ModuleType) -> Iterator[tuple[str, str]]:
    """(qualified name, cleaned docstring) for a module, its classes, functions and methods."""

    def doc(obj) -> str | None:
        text = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
        return inspect.cleandoc(text) if text else None

    if text := doc(module):
        yield module.__name__, text
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if text := doc(obj):
            yield f"{module.__name__}.{attr}", text
        if inspect.isclass(obj):
            for method_name, method in sorted(vars(obj).items()):
                # only the class's own methods: libraries monkeypatch stdlib classes (e.g.
                # transformers adds logging.Logger.warning_advice), which would make the corpus
                # depend on what the process imported before
                own = getattr(method, "__module__", None) == module.__name__
                if inspect.isfunction(method) and own and not method_name.startswith("_"):
                    if text := doc(method):
                        yield f"{module.__name__}.{attr}.{method_name}", text


def package_docstrings(name: str) -> list[tuple[str, str]]:
    """Every docstring of at least MIN_DOC_CHARS in package `name`, first occurrence only."""
    seen, out = set(), []
    with warnings.catch_warnings():  # attribute access on deprecated aliases (typing.io) warns
        warnings.simplefilter("ignore")
        for module in package_modules(name):
            for qualname, text in module_docstrings(module):
                if len(text) >= MIN_DOC_CHARS and text not in seen:
                    seen.add(text)
                    out.append((qualname, text))
    return out


def pydoc_topics() -> list[tuple[str, str]]:
    """(topic, text) of the language reference topics shipped in `pydoc_data.topics`."""
    from pydoc_data.topics import topics  # ~1 MB of text: only when the corpus is built

    return [(f"pydoc.{name}", topics[name].strip()) for name in sorted(topics)]


def summary(text: str, max_chars: int = 400) -> str:
    """The leading paragraphs of a docstring, at most `max_chars` (cut at a word if needed)."""
    out = ""
    for paragraph in text.split("\n\n"):
        candidate = f"{out}\n\n{paragraph}" if out else paragraph
        if len(candidate) > max_chars:
            break
        out = candidate
    if not out:  # the first paragraph alone is too long
        out = text[:max_chars].rsplit(" ", 1)[0]
    return out.strip()
