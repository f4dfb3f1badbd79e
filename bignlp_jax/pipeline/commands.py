"""`bignlp-jax pipeline PIPELINE.yaml [--stage NAME] [--list-stages] [overrides]`.

Without --stage, runs every stage in order and prints the report. A stage is skipped only if it
finished with the settings and inputs it has now; a stale stage reruns, and with it everything
downstream (`--refuse-stale`: list the stale stages and stop instead).
`--stage NAME` runs one stage (what the SLURM / Kubernetes launchers do, one job per stage);
`--list-stages` prints the stage names as a JSON list on its last line.
"""

from __future__ import annotations

import argparse
import json

from bignlp_jax.access import check_path
from bignlp_jax.owned import claim

# Function-level imports: a command loads its package only when run (a fast `--help`).


def cmd_pipeline(args) -> int:
    from bignlp_jax.pipeline.spec import Pipeline

    pipeline = Pipeline.load(args.pipeline, args.overrides)
    stages = pipeline.stages()
    if args.list_stages:
        print(json.dumps(stages))
        return 0

    import jax

    from bignlp_jax.errors import UserError
    from bignlp_jax.pipeline.report import PLOT_FILE, REPORT_FILE, write_report
    from bignlp_jax.pipeline.stages import check_inputs, execute
    from bignlp_jax.pipeline.state import STALE_DIR, STATE_FILE, freshness, read_state, why_stale

    # before any stage: a local dir gets a probe file, a bucket a marker written and deleted
    check_path(pipeline.out, "output_dir", what="the pipeline's output_dir")
    # what the pipeline writes at the top of output_dir: refused if the user's files are there
    ours = [*stages, REPORT_FILE, PLOT_FILE, STATE_FILE, f"{STATE_FILE}.tmp", STALE_DIR]
    claim(pipeline.out, ours, "output_dir", record=False)
    if pipeline.spec.export is not None and "export" not in stages:
        print("[pipeline] export: left out (bignlp_jax.hf.weights is not available)")
    if pipeline.spec.lm_eval is not None and "lm_eval" not in stages:
        print("[pipeline] lm_eval: left out (lm-eval is not installed: pip install -e '.[eval]')")
    if args.stage is not None:
        if args.stage not in stages:
            raise UserError(f"pipeline {pipeline.path} has no stage {args.stage!r}; its stages: "
                            f"{', '.join(stages)}")
        check_inputs(pipeline, args.stage)  # a refused stage leaves output_dir as it was
        todo = [args.stage]
    else:
        todo = stages
    if args.refuse_stale:
        log = read_state(pipeline)
        stale = [s for s in todo if freshness(pipeline, s, log) == "stale"]
        if stale:
            listed = "\n".join(f"  {s}: {why_stale(pipeline, s, log)}" for s in stale)
            raise UserError(
                f"pipeline {pipeline.path}: {len(stale)} stage(s) in {pipeline.out} were made "
                f"from other settings or inputs:\n{listed}\n  fix: run without --refuse-stale "
                "to redo them (old outputs are moved to "
                f"{pipeline.out / 'stale'}), or put the old settings back")
    claim(pipeline.out, ours, "output_dir", record=jax.process_index() == 0)
    pipeline.enable_compilation_cache()
    for stage in todo:
        execute(pipeline, stage)
    # the report needs the evaluation; after a lone earlier stage there is nothing to say yet
    if jax.process_index() == 0 and {"evaluate", "export", "lm_eval"} & set(todo):
        text = write_report(pipeline)
        print("\n" + text)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="tokenizer -> pretrain -> finetune -> evaluate -> export")
    p.add_argument("pipeline", help="pipeline YAML (path, or name under configs/, e.g. "
                                    "pipelines/default)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="dotted overrides of the pipeline file, e.g. pretrain.train.steps=50")
    p.add_argument("--stage", default=None, help="run only this stage (see --list-stages)")
    p.add_argument("--refuse-stale", action="store_true",
                   help="if any stage's output was made from other settings or inputs, list "
                        "those stages and exit 2 (default: rerun them and what depends on them)")
    p.add_argument("--list-stages", action="store_true",
                   help="print the stage names in order, as a JSON list on the last line")
    p.set_defaults(func=cmd_pipeline)
