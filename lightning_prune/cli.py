"""``lightning-prune``: Lightning's command line with structured pruning as its own argument group.

    lightning-prune fit --config examples/configs/cifar10_resnet56_pls_vip_5steps.yaml
    lightning-prune fit --config examples/configs/cifar10_resnet56_pls_vip_5steps.yaml \\
        --pruning.criterion l1 --pruning.epochs '[3, 6]' --data.fake true

Everything :class:`~lightning.pytorch.cli.LightningCLI` offers is there (``fit``, ``validate``,
``test``, ``predict``; ``--config``, ``--print_config``, ``--trainer.*``, ``--optimizer``,
``--lr_scheduler``); on top of it every argument of
:class:`~lightning_prune.StructuredPruningCallback` is settable under ``pruning:`` in a YAML file
or as ``--pruning.<argument>``, and the callback joins the trainer's callbacks. The model and the
data module are chosen by ``class_path`` (any ``LightningModule`` / ``LightningDataModule``, e.g.
:class:`~lightning_prune.models.ImageClassifier` with a ``net`` given by class path, and
:class:`~lightning_prune.data.CIFAR10DataModule`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_prune.callback import StructuredPruningCallback

__all__ = ["PruningCLI", "main", "merged_kwargs_arguments"]

#: The argument group of the callback (``--pruning.criterion`` ...).
PRUNING_KEY = "pruning"


class PruningCLI(LightningCLI):
    """A :class:`~lightning.pytorch.cli.LightningCLI` with :class:`StructuredPruningCallback` as the
    ``pruning`` argument group.

    The callback is built from that group and appended to the trainer's callbacks (after those of
    ``trainer.callbacks``); the model and the data module are given by class path (subclass mode).
    Construct it like ``LightningCLI`` (``args=[...]`` parses a list instead of ``sys.argv``).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the callback's arguments under ``pruning``."""
        parser.add_lightning_class_args(StructuredPruningCallback, PRUNING_KEY)

    @property
    def pruning(self) -> StructuredPruningCallback | None:
        """The pruning callback of the trainer (None before the trainer exists)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        return next((c for c in trainer.callbacks if isinstance(c, StructuredPruningCallback)), None)


_KWARGS_FLAG = f"--{PRUNING_KEY}.criterion_kwargs"


def merged_kwargs_arguments(args: Sequence[str]) -> list[str]:
    """``--pruning.criterion_kwargs={...}`` given as one mapping, rewritten key by key
    (``--pruning.criterion_kwargs.<key>=<value>``) so that it updates the configuration's
    ``criterion_kwargs`` instead of replacing them (jsonargparse replaces a whole mapping but merges
    dotted keys). Anything that is not a mapping is left to the parser, which reports it."""
    out: list[str] = []
    items = list(args)
    index = 0
    while index < len(items):
        arg = items[index]
        value: str | None = None
        if arg.startswith(_KWARGS_FLAG + "="):
            value = arg.split("=", 1)[1]
        elif arg == _KWARGS_FLAG and index + 1 < len(items):
            value = items[index + 1]
            index += 1
        parsed = _mapping(value) if value is not None else None
        if parsed is None:
            out.extend([arg] if value is None or arg != _KWARGS_FLAG else [arg, value])
        else:
            out.extend(f"{_KWARGS_FLAG}.{key}={_cli_value(item)}" for key, item in parsed.items())
        index += 1
    return out


def _cli_value(item: Any) -> str:
    """``item`` as a command-line value the parser reads back as ``item``: a plain string as it is (the
    parser keeps a JSON-quoted one with its quotes: ``'"cls"'``), anything else as JSON."""
    import yaml

    if isinstance(item, str):
        try:
            if yaml.safe_load(item) == item:
                return item
        except yaml.YAMLError:
            pass
    return json.dumps(item)


def _mapping(text: str) -> dict[str, Any] | None:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return value if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) else None


def main(args: Sequence[str] | dict[str, Any] | None = None, *, run: bool = True, return_cli: bool = False) -> PruningCLI | None:
    """Entry point of the ``lightning-prune`` command.

    Args:
        args: the command line without the program name (default None: ``sys.argv[1:]``), e.g.
            ``["fit", "--config", "examples/configs/cifar10_resnet56_pls_vip_5steps.yaml"]``; a dict
            is parsed as a configuration.
        run: run the subcommand (default True). With False, no subcommand is expected: the model,
            data module and trainer (with the callback) are only built.
        return_cli: return the :class:`PruningCLI` (default False: return None, so that the
            console script exits with status 0).

    Returns:
        With ``return_cli``, the CLI: its ``model``, ``datamodule``, ``trainer`` and
        :attr:`PruningCLI.pruning` (the callback, with its ``history``); otherwise None.

    Raises:
        SystemExit: invalid arguments (jsonargparse prints what is wrong, exit code 2), or
            ``--help`` / ``--print_config`` (exit code 0).
    """
    if args is None:
        args = sys.argv[1:]
    cli = PruningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args if isinstance(args, dict) else merged_kwargs_arguments(args),
        run=run,
        auto_configure_optimizers=True,
    )
    return cli if return_cli else None


if __name__ == "__main__":  # pragma: no cover
    main()
