"""An lm-evaluation-harness model (`lm_eval.api.model.LM`) backed by a bignlp_jax checkpoint.

All three request types of the harness run in this process on the run's mesh:

- `loglikelihood`: log p(continuation | context) and whether the continuation is the greedy one;
- `loglikelihood_rolling`: a whole document's log-likelihood, in windows of `max_length`
  tokens laid out by the harness's own `get_rolling_token_windows` / `make_disjoint_window`;
- `generate_until`: our key/value-cache generation (greedy, or sampled with temperature / top_k
  / top_p), cut at the task's stop sequences, at most `max_gen_toks` new tokens.

Text becomes tokens exactly as the harness's `hf` backend does with our Hugging Face export of
the same run (`bignlp-jax export --format hf`): the exported tokenizer puts <s> before every text
(`add_bos_token: true`, how our models were trained), so by default contexts, whole documents
and prompts start with <s>; `add_bos_token=False` drops it, as the `hf` backend's model argument
of that name does. A context is split from its continuation as the harness does: trailing
spaces move to the continuation, and the continuation is what encoding the pair adds to the
encoded context. The golden test (tests/test_lm_eval.py) holds the two backends to the same
per-request numbers.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from bignlp_jax.data.tokenizer import Tokenizer
from bignlp_jax.evaluate.harness_runner import HarnessRunner, check_same_requests

log = logging.getLogger(__name__)

# The harness's default number of new tokens when a task sets no max_gen_toks (as `hf`).
DEFAULT_MAX_GEN_TOKS = 256


def decode_like_hf(tokenizer: Tokenizer, ids) -> str:
    """Text of `ids` as our exported Hugging Face tokenizer decodes it, skipping special
    tokens and ids it does not know: pieces with U+2581 as spaces, each run of byte pieces one
    UTF-8 string (or one U+FFFD per byte when the run is not valid UTF-8), then one leading
    space dropped.

    SentencePiece's own decode differs only on invalid byte runs (it keeps their valid part),
    which a generation cut at `max_gen_toks` can end in; generated text must match the hf
    backend's exactly."""
    sp = tokenizer.sp
    parts: list[str] = []
    run: list[int] = []  # bytes of consecutive byte pieces

    def flush() -> None:
        if run:
            try:
                parts.append(bytes(run).decode("utf-8"))
            except UnicodeDecodeError:
                parts.append("\ufffd" * len(run))
            run.clear()

    for i in (int(t) for t in ids):
        # ids past the tokenizer (a model vocabulary padded to a multiple of 128) and special
        # pieces are skipped, without ending a run of bytes
        if not 0 <= i < tokenizer.vocab_size or sp.is_control(i) or sp.is_unknown(i):
            continue
        if sp.is_byte(i):
            run.append(int(sp.id_to_piece(i)[3:5], 16))  # "<0x0A>" -> 10
            continue
        flush()
        parts.append(sp.id_to_piece(i).replace("\u2581", " "))
    flush()
    return "".join(parts).removeprefix(" ")


class BignlpLM(TemplateLM):
    """The harness's view of one checkpoint: tokenizer + `HarnessRunner`.

    Every process of a multi-process job runs the whole harness and hands this model the same
    requests (checked); the harness sees one rank, so it neither splits nor gathers requests."""

    def __init__(self, runner: HarnessRunner, tokenizer: Tokenizer, *,
                 add_bos_token: bool | None = None, seed: int = 0, name: str = "bignlp_jax"):
        super().__init__()
        self.runner, self.tok = runner, tokenizer
        self.add_bos_token = add_bos_token
        self.seed = seed
        self.name = name
        self._rank, self._world_size = 0, 1
        self._bos_text = tokenizer.sp.id_to_piece(tokenizer.bos_id) if tokenizer.bos_id >= 0 \
            else None
        self._eos_text = tokenizer.sp.id_to_piece(tokenizer.eos_id)

    # --- tokens ---------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and every rolling document) is conditioned on: <s>."""
        return self.tok.bos_id if self.tok.bos_id >= 0 else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.runner.max_length

    @property
    def tokenizer_name(self) -> str:
        return f"{self.name}-sentencepiece-{self.tok.vocab_size}"

    def _adds_bos(self, text: str, add_special_tokens: bool | None) -> bool:
        if self.tok.bos_id < 0:
            return False
        if add_special_tokens is not None:
            return add_special_tokens
        if self._bos_text is not None and text.startswith(self._bos_text):
            return False  # the text carries its own <s> (as the harness's hf backend reads it)
        return True if self.add_bos_token is None else self.add_bos_token

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        ids = ([self.tok.bos_id] if self._adds_bos(string, add_special_tokens) else []) + \
            self.tok.encode(string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return decode_like_hf(self.tok, tokens)

    # --- requests -------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        check_same_requests(pairs, "loglikelihood")
        results = self.runner.score(pairs)
        for (request, _, _), answer in zip(requests, results):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[list[int], list[int]]] = []
        counts = []
        for (text,) in (request.args for request in requests):
            doc = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows.extend(doc)
            counts.append(len(doc))
        check_same_requests(windows, "loglikelihood_rolling")
        scores = self.runner.score(windows)
        totals, at = [], 0
        for request, count in zip(requests, counts):
            total = sum(score for score, _ in scores[at:at + count])
            at += count
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests grouped by their generation settings (one `generate` call per group)."""
        args = [request.args for request in requests]
        check_same_requests([(c, sorted(g.items())) for c, g in args], "generate_until")
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(args)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(args[members[0]][1], DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self._eos_text)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            # do_sample without a temperature samples at 1 (as transformers); temperature 0 is
            # greedy whatever do_sample says (the harness warns about that combination)
            temperature = float(kwargs.get("temperature", 1.0) or 0.0)
            sample = bool(kwargs.get("do_sample")) and temperature > 0
            kwargs["temperature"] = temperature
            prompts = [self._prompt(args[i][0]) for i in members]
            texts = self._generate(prompts, max_gen_toks, sample, kwargs)
            for i, text in zip(members, texts):
                out[i] = postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", args[i], out[i])
        return out

    def _prompt(self, context: str) -> list[int]:
        ids = self.tok_encode(context)
        return ids or [self.prefix_token_id]

    def _generate(self, prompts: list[list[int]], max_gen_toks: int, sample: bool,
                  kwargs: dict[str, Any]) -> list[str]:
        top_k = kwargs.get("top_k")
        top_p = kwargs.get("top_p")
        new = self.runner.generate(
            prompts, max_gen_toks, temperature=float(kwargs["temperature"]) if sample else 0.0,
            top_k=int(top_k) if sample and top_k else None,
            top_p=float(top_p) if sample and top_p is not None else None,
            seed=int(kwargs.get("seed", self.seed)), eos_id=self.tok.eos_id,
            pad_id=self.tok.pad_id)
        return [self.tok_decode(ids) for ids in new]
