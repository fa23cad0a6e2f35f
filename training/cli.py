"""`deqguard train`: options from a JSON/TOML file, overridden by flags (one flag per
:class:`~training.config.TrainConfig` field, generated so the two never drift apart)."""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from dataclasses import MISSING, fields
from typing import Any

from training.config import TrainConfig, load_config_file

__all__ = ["build_parser", "config_from_args", "main"]


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _optional(conv: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else conv(text)

    return parse


def _converter(tp: Any) -> tuple[Any, list[str] | None]:
    """argparse type and choices for a dataclass field annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return str, list(args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        conv, choices = _converter(inner[0])
        return _optional(conv), choices
    if tp is bool:
        return _parse_bool, None
    if tp in (int, float, str):
        return tp, None
    return str, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deqguard train",
        description="Train an MDEQ classifier (clean, PGD-AT or TRADES; Sec. 3.3 random "
        "intermediate states optional). Flags override the --config file.",
    )
    parser.add_argument("--config", help="JSON or TOML file of options (keys as the flags)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out_dir>/<name>/state.{safetensors,json} if present",
    )
    parser.add_argument(
        "--max-new-steps", type=int, default=None, help="stop after this many steps (testing)"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved options and exit"
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        conv, choices = _converter(hints[f.name])
        default = f.default if f.default is not MISSING else None
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=conv,
            choices=choices,
            default=argparse.SUPPRESS,
            help=f"(default: {default})",
        )
    return parser


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """File options first, then the flags given on the command line; validated once."""
    opts: dict[str, Any] = {}
    if ns.config:
        opts.update(load_config_file(ns.config))
    names = {f.name for f in fields(TrainConfig)}
    opts.update({k: v for k, v in vars(ns).items() if k in names})
    return TrainConfig.from_dict(opts)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config_from_args(ns)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if ns.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from training.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        state = trainer.fit(resume=ns.resume, max_new_steps=ns.max_new_steps)
    finally:
        trainer.close()
    if trainer.dist.main:
        print(
            json.dumps(
                {
                    "name": cfg.name,
                    "step": state.step,
                    "total_steps": trainer.total_steps,
                    "finished": state.finished,
                    "elapsed_min": round(state.elapsed_s / 60, 2),
                    "best_step": state.best_step,
                    "best_val_pgd": state.best_score,
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
