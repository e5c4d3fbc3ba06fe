"""``streamproc`` (also ``python -m streamproc``): plan, run, produce, demo.

Settings are parsed once, here, and passed down. A bad setting exits with code 2 and a
message naming the variable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from . import __version__, signals
from .errors import ConfigError, StreamprocError
from .ops.logs import configure_logging
from .settings import Settings, load_settings

__all__ = ["main"]

log = logging.getLogger("streamproc")


def plan_report(settings: Settings) -> dict[str, Any]:
    """Resolved settings (secrets masked) and the replica plan of every device, before loading.
    The plan uses ``GPU_ESTIMATED_MODEL_SIZE_GB``; at start the measured footprint replaces it."""
    from .inference.planner import plan_device, probe_memory, resolve_devices

    config = settings.gpu_config()
    plans = [plan_device(probe_memory(d), config) for d in resolve_devices(config)]
    return {"settings": settings.masked(), "model": settings.resolved_model_name,
            "plan": [p.as_dict() for p in plans], "describe": [p.describe() for p in plans]}


def cmd_plan(settings: Settings, args: argparse.Namespace) -> int:
    report = plan_report(settings)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    width = max(len(k) for k in report["settings"])
    for key, value in report["settings"].items():
        print(f"{key:<{width}}  {value}")
    print(f"\nmodel: {report['model']}")
    for line in report["describe"]:
        print(f"plan  {line}")
        for plan in report["plan"]:
            if plan["warning"] and plan["device"] in line:
                print(f"warning: {plan['warning']}")
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    """The whole path on the bundled sample feed, offline: through Kafka, or the engine
    alone."""
    from .demo.engine_only import demo_settings, run_engine_demo
    from .demo.through_kafka import run_kafka_demo

    settings = demo_settings(settings)
    if args.engine_only:
        return asyncio.run(run_engine_demo(settings))
    return asyncio.run(run_kafka_demo(settings))


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from .service import serve  # the service's imports take a second or more

    return serve(settings)


def cmd_produce(settings: Settings, args: argparse.Namespace) -> int:
    from .kafka.produce import produce_file

    count = asyncio.run(produce_file(settings, args.file, topic=args.topic))
    print(f"produced {count} records to {args.topic or settings.kafka_input_topic}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="streamproc", description=__doc__.splitlines()[0])
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    top.add_argument("--env-file", default=".env", help="dotenv file to read (default: .env)")
    sub = top.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="print resolved settings and the replica plan, then exit")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(func=cmd_plan)
    run = sub.add_parser("run", help="run the Kafka service until SIGTERM/SIGINT")
    run.set_defaults(func=cmd_run)
    produce = sub.add_parser("produce", help="send a JSON-lines file of feed items")
    produce.add_argument("file")
    produce.add_argument("--topic", default=None, help="default: KAFKA_INPUT_TOPIC")
    produce.set_defaults(func=cmd_produce)
    demo = sub.add_parser("demo", help="the whole path on the bundled sample feed, offline")
    demo.add_argument("--engine-only", action="store_true",
                      help="skip Kafka: summarize the sample feed with the engine alone")
    demo.set_defaults(func=cmd_demo)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "run":
        signals.catch()  # before anything slow: a SIGTERM now must not kill us silently
    try:
        settings = load_settings(args.env_file)
    except ConfigError as exc:
        print(f"streamproc: invalid setting {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bars
    try:
        return int(args.func(settings, args))
    except ConfigError as exc:
        print(f"streamproc: invalid setting {exc}", file=sys.stderr)
        return 2
    except StreamprocError as exc:
        log.error("%s: %s", type(exc).__name__, exc.reason)
        return 1
    except KeyboardInterrupt:
        return 130
