"""The ``itpn-ds`` console script.

Each subcommand lives in a module that defines ``add_arguments(parser, command)`` and ``main(args) -> int``
(``args.command`` holds the subcommand name, so one module can serve several subcommands).
Modules are imported only when their subcommand runs, so ``itpn-ds --help`` stays fast.

Every subcommand runs inside one error boundary (``itpn_ds.errors``): an anticipated failure is one line
``itpn-ds COMMAND: MESSAGE`` on stderr and exit code 2; ``itpn-ds --debug COMMAND ...`` (or
``ITPN_DS_DEBUG=1``) keeps the traceback.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
import traceback
from typing import Callable, NoReturn

from itpn_ds.errors import DEBUG_ENV, USER_ERROR_EXIT_CODE, debug_enabled, print_error_line, user_message

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "make-shards": ("data_tools.make_shards", "preprocess images into WebDataset shards + DALI index + manifest"),
    "verify-shards": ("data_tools.verify_shards", "check shard checksums, sample counts and index files"),
    "make-dense-shapes": ("data_tools.dense_shapes", "write a synthetic segmentation + detection set (shapes on photos)"),
    "extract-teacher": ("data_tools.extract_teacher", "compute CLIP targets for K views per image into Arrow files"),
    "plan-cache": ("data_tools.plan_cache", "bytes and files a teacher cache needs"),
    "plan-scaling": ("itpn_ds.scaling.command", "memory and throughput plan for a model at a GPU count"),
    "pretrain": ("itpn_ds.engine.commands", "iTPN pre-training on DeepSpeed"),
    "finetune": ("itpn_ds.engine.commands", "fine-tune a classifier on DeepSpeed"),
    "detect": ("itpn_ds.engine.commands", "fine-tune a Mask R-CNN detector on DeepSpeed (COCO box / mask AP)"),
    "segment": ("itpn_ds.engine.commands", "fine-tune UperNet semantic segmentation on DeepSpeed"),
    "evaluate": ("itpn_ds.engine.commands", "evaluate a checkpoint: top-1/top-5, mIoU or COCO AP, by the recipe's task"),
    "export": ("itpn_ds.engine.commands", "export a checkpoint to one safetensors file + JSON metadata"),
    "probe": ("itpn_ds.engine.probe_command", "k-NN probe of a checkpoint's frozen features on labelled shards"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="itpn-ds", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=f"tracebacks for user errors too (or {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--debug"]:
        os.environ[DEBUG_ENV] = "1"
        argv = argv[1:]
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or the "invalid choice" error and exits
        return USER_ERROR_EXIT_CODE
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"itpn-ds {name}", description=COMMANDS[name][1])
    module.add_arguments(sub, name)
    args = sub.parse_intermixed_args(rest)  # key=value overrides may come before or after the options
    args.command = name
    return run_reporting_errors(name, module.main, args)


def run_reporting_errors(name: str, command_main: Callable[[argparse.Namespace], int | None],
                         args: argparse.Namespace) -> int:
    """``command_main(args)``; an anticipated failure becomes one line on stderr and exit code 2."""
    try:
        return int(command_main(args) or 0)
    except Exception as exc:  # noqa: BLE001 - the boundary: user errors reported, bugs re-raised
        message = user_message(exc)
        if message is None:
            raise
        if debug_enabled():
            traceback.print_exc()
        one_line = " ".join(message.split())  # a wrapped library message (DALI's, pydantic's) stays one line
        print_error_line(f"itpn-ds {name}: {one_line}")
        return USER_ERROR_EXIT_CODE


def run() -> NoReturn:
    """The ``itpn-ds`` process: ``main()``, then exit with its code.

    Before exiting, ``gc.freeze()`` takes every object alive out of the cyclic collector's reach: torch, DeepSpeed,
    dynamo and timm leave a few million of them, and the interpreter's teardown would otherwise walk them in full
    collections, about 2 s of CPU per process on this 2-core machine kind (a 2-step tiny pre-training process:
    8 s -> 6 s). Nothing else changes: atexit handlers (logging, MLflow), thread joins and flushes run as before.
    ``main`` itself leaves the collector alone, as it also runs inside other processes (the tests).
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
