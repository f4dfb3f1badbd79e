"""`bignlp-jax generate --run RUN_DIR --prompt TEXT [--prompt ...]`: continue prompts with a
trained model and its own tokenizer (RUN_DIR/tokenizer)."""

from __future__ import annotations

import argparse
import json

# Function-level imports: a command loads its package only when run (a fast `--help`).


def cmd_generate(args) -> int:
    from bignlp_jax.checkpoint import load_params, load_run_config
    from bignlp_jax.containment import contained
    from bignlp_jax.data.tokenizer import load_tokenizer
    from bignlp_jax.errors import UserError
    from bignlp_jax.infer.generate import generate
    from bignlp_jax.rundir import TOKENIZER

    cfg = load_run_config(args.run)
    contained(args.run, TOKENIZER)  # a run's tokenizer/ leading outside it is refused
    try:
        tokenizer = load_tokenizer(args.run)
    except UserError:
        if not cfg.data.tokenizer:
            raise UserError(f"run {args.run} has no tokenizer/ directory and its config names "
                            "none (data.tokenizer); text generation needs the run's tokenizer"
                            ) from None
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    for i, text in enumerate(args.prompt):
        if not text.strip():
            raise UserError(f"--prompt number {i + 1} is empty; give some text to continue")
    # a task model was trained on <s> prompt <sep>: ask it the same way
    sep = [tokenizer.sep_id] if cfg.task is not None and tokenizer.sep_id is not None else []
    prompts = [[tokenizer.bos_id, *tokenizer.encode(t), *sep] for t in args.prompt]
    params = load_params(args.run, cfg.model, step=args.step, lora=cfg.lora)
    outputs = generate(cfg.model, params, prompts, args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                       overflow=args.overflow)
    texts = [tokenizer.decode(ids) for ids in outputs]
    for prompt, text in zip(args.prompt, texts):
        print(f"=== {prompt}\n{text}")
    print(json.dumps([{"prompt": p, "output": t, "tokens": len(o)}
                      for p, t, o in zip(args.prompt, texts, outputs)]))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue text prompts with a trained run")
    p.add_argument("--run", required=True, help="run directory (its newest checkpoint)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate after each prompt (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 is greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample only from the K most likely tokens (default: no limit)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens whose probability reaches P, "
                        "0 < P <= 1 (default: no limit)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the sampling (default: 0; unused when greedy)")
    p.add_argument("--overflow", choices=("truncate", "error"), default="truncate",
                   help="prompts longer than the context: keep their end (warn) or fail "
                        "(default: truncate)")
    p.set_defaults(func=cmd_generate)
