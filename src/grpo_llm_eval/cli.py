"""Command line: `grpo_llm_eval [train|judge|calibrate|evaluate|report] ...`. Errors exit non-zero with one clear line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from grpo_llm_eval.config.load import (
    ConfigError,
    apply_overrides,
    dump_yaml,
    is_redacted,
    load_config,
    read_yaml,
    validate,
)

logger = logging.getLogger("grpo_llm_eval")
COMMANDS = ("train", "judge", "calibrate", "evaluate", "report")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (default: the embedded offline config, configs/offline.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key; value parsed as YAML; dotted keys reach sections (trl.loss_type=dr_grpo)")
    p.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo_llm_eval", description="GRPO on a teacher LLM's rubric grades.")
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train", help="train the student (the default command)")
    _common(train)
    train.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and an estimate of the teacher's calls, tokens and cost "
                       "(reads a sample of the data; loads no model)")
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                       help="resume the run: the latest checkpoint in its folder, or the checkpoint PATH")
    judge = sub.add_parser("judge", help="grade existing responses with the teacher")
    _common(judge)
    judge.add_argument("--input", required=True, help="JSONL with question, response (or completion), answer")
    judge.add_argument("--output", required=True, help="JSONL to write, one graded row per input row")
    cal = sub.add_parser("calibrate", help="measure the teacher against the verifier before training on it")
    _common(cal)
    cal.add_argument("--model", help="model whose responses are graded (default: the config's student); same forms "
                                     "as evaluate --model")
    cal.add_argument("--responses", help="JSONL of question, response, answer to grade instead of sampling a model")
    cal.add_argument("--split", help="dataset split (default: the config's eval_split)")
    cal.add_argument("--limit", type=int, default=0, help="first N prompts only (0: all)")
    cal.add_argument("--samples", type=int, default=4, help="sampled responses per prompt (default 4)")
    cal.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    cal.add_argument("--output", required=True, help="folder for calibration.json and calibration_rollouts.jsonl")
    evaluate = sub.add_parser("evaluate", help="generate with models on held-out prompts; grade; compare")
    _common(evaluate)
    evaluate.add_argument("--model", dest="models", action="append", required=True, metavar="M",
                          help="Hub id, folder, checkpoint-N folder, bundled:NAME or run:DIR; repeat to compare "
                               "(each against the first)")
    evaluate.add_argument("--split", help="dataset split (default: the config's eval_split)")
    evaluate.add_argument("--limit", type=int, default=0, help="first N prompts only (0: all)")
    evaluate.add_argument("--samples", type=int, default=1, help="responses per prompt (1: greedy, else sampled)")
    evaluate.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    evaluate.add_argument("--output", required=True, help="folder for eval_rollouts.jsonl and eval_summary.json")
    report = sub.add_parser("report", help="write a self-contained HTML report of a run")
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    report.add_argument("--output", help="HTML file to write (default: RUN_DIR/report.html)")
    report.add_argument("--eval", dest="eval_dir", help="folder (or file) with eval_summary.json to include (in the "
                                                        "report and in final/'s model card)")
    report.add_argument("--calibration", dest="calibration_dir",
                        help="folder (or file) with calibration.json (from `calibrate`) to include (in the report and "
                             "in final/'s model card)")
    report.add_argument("--max-rows", type=int, default=2000, help="rollouts shown in the table: the last N")
    report.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")
    return parser


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2", "openai", "urllib3", "filelock", "datasets",
                  "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    if not debug:
        # Deprecation notices from the libraries (TRL passes transformers' renamed arguments) are not the
        # user's to act on; --debug shows them.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        logging.getLogger("math_verify").setLevel(logging.ERROR)


def _known_errors() -> tuple[type[BaseException], ...]:
    from grpo_llm_eval.data import DataError
    from grpo_llm_eval.data.rubrics import RubricError
    from grpo_llm_eval.evaluation.calibrate import CalibrationError
    from grpo_llm_eval.models import ModelError
    from grpo_llm_eval.teacher.types import TeacherUnavailable
    from grpo_llm_eval.training.checkpoints import ResumeError, SaveError
    from grpo_llm_eval.training.model_card import PushError
    from grpo_llm_eval.training.run_dir import RunDirError
    from grpo_llm_eval.training.train import TrainingAborted

    return (DataError, ModelError, RunDirError, TeacherUnavailable, ResumeError, SaveError, TrainingAborted,
            CalibrationError, RubricError, PushError)


def _resume_config(args):
    """With --resume: the run to continue, and its own config.yaml unless --config is given.

    The run's config.yaml holds openai_base_url with its credentials redacted; there OPENAI_BASE_URL from the
    environment takes its place (`--set` still wins), and without it validation refuses the placeholder.
    """
    from grpo_llm_eval.training.checkpoints import find_resume

    base = load_config(args.config, args.overrides)
    run, checkpoint = find_resume(base.output_dir, base.run_name, args.resume)
    source = args.config or str(run / "config.yaml")
    pinned = [f"output_dir={run.parent}", f"run_name={run.name}"]
    data = read_yaml(source)
    env_url = os.environ.get("OPENAI_BASE_URL")
    if is_redacted(str(data.get("openai_base_url") or "")) and env_url:
        data["openai_base_url"] = env_url
        logger.info("openai_base_url: the run's config.yaml holds it redacted; using OPENAI_BASE_URL")
    return validate(apply_overrides(data, list(args.overrides) + pinned)), checkpoint


def run_train(args) -> int:
    if args.resume:
        cfg, checkpoint = _resume_config(args)
    else:
        cfg, checkpoint = load_config(args.config, args.overrides), None
    if args.dry_run:
        sys.stdout.write(dump_yaml(cfg))
        from grpo_llm_eval.training.estimate import estimate_lines

        sys.stdout.write("\n".join(estimate_lines(cfg)) + "\n")  # YAML comments: the output still loads
        return 0
    from grpo_llm_eval.training.train import train

    result = train(cfg, resume=checkpoint)
    logger.info("Done: %d steps. Run folder: %s (final model: %s)", result.global_step, result.run_dir, result.final_dir)
    return 0


def run_judge(args) -> int:
    from grpo_llm_eval.evaluation.judge_file import judge_file

    cfg = load_config(args.config, args.overrides)
    summary = judge_file(cfg, args.input, args.output)
    logger.info("Graded %d rows (%d ok) into %s", summary["rows"], summary["ok"], args.output)
    logger.info("Teacher spend: %s", summary["teacher_usage"]["text"])
    return 0


def run_evaluate(args) -> int:
    from grpo_llm_eval.evaluation.evaluate import evaluate, format_table

    cfg = load_config(args.config, args.overrides)
    summary = evaluate(cfg, args.models, args.output, split=args.split, limit=args.limit, samples=args.samples,
                       batch_size=args.batch_size)
    sys.stdout.write(format_table(summary) + "\n")
    logger.info("Teacher spend: %s", summary["teacher_usage"]["text"])
    logger.info("Wrote %s/eval_rollouts.jsonl and %s/eval_summary.json", args.output, args.output)
    return 0


def run_calibrate(args) -> int:
    from grpo_llm_eval.evaluation.calibrate import calibrate, format_table

    cfg = load_config(args.config, args.overrides)
    result = calibrate(cfg, args.output, model=args.model, limit=args.limit, samples=args.samples,
                       responses=args.responses, split=args.split, batch_size=args.batch_size)
    sys.stdout.write(format_table(result) + "\n")
    logger.info("Wrote %s/calibration.json and %s/calibration_rollouts.jsonl", args.output, args.output)
    return 0


def run_report(args) -> int:
    from grpo_llm_eval.evaluation.report import build_report

    path = build_report(args.run_dir, output=args.output, eval_dir=args.eval_dir, max_rows=args.max_rows,
                        calibration_dir=args.calibration_dir)
    logger.info("Report: %s", path)
    return 0


def _enable_faulthandler() -> None:
    """A crash in native code (llama.cpp, torch) prints where it happened instead of dying without a word."""
    import faulthandler

    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable()
    except (AttributeError, OSError, ValueError):  # a stderr with no file descriptor (captured, embedded)
        pass


def main(argv: list[str] | None = None) -> int:
    _enable_faulthandler()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["train", *argv]  # train is the default command
    args = build_parser().parse_args(argv)
    _setup_logging(args.debug)
    handlers = {"train": run_train, "judge": run_judge, "calibrate": run_calibrate, "evaluate": run_evaluate,
                "report": run_report}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from grpo_llm_eval.training.train import TrainingInterrupted

        if isinstance(exc, TrainingInterrupted):
            print(str(exc), file=sys.stderr)
            return exc.exit_code
        if args.debug:
            raise
        known = isinstance(exc, _known_errors())
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{'error' if known else f'error ({type(exc).__name__})'}: {text}", file=sys.stderr)
        if not known:
            print("run again with --debug for the full traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
