"""The `mmcoa` command: one subcommand per pipeline stage, plus tools.

Stages (chained by dvc.yaml): fetch -> base -> baseline -> finetune -> evaluate -> report.
Tools: attack (one attack on a saved model), datasets/defenses/models (what is registered), seeds.
Errors a user can fix print one line and exit 2; a diverged training run exits 1.
"""

from __future__ import annotations

import importlib
import sys

import typer

from stages.common import StageError, console

# command -> (module, function). A command's module (and the libraries it needs: torch, open_clip,
# scikit-learn, matplotlib) is imported only when that command runs, so a stage process starts in a
# few seconds rather than paying for every other stage's imports.
COMMANDS: dict[str, tuple[str, str]] = {
    "fetch": ("stages.fetch", "fetch"),
    "fetch-eval": ("stages.fetch", "fetch_eval"),
    "base": ("stages.base", "base"),
    "baseline": ("stages.evaluate", "baseline"),
    "finetune": ("stages.finetune", "finetune"),
    "evaluate": ("stages.evaluate", "evaluate"),
    "attack": ("stages.attack", "attack"),
    "report": ("stages.report", "report"),
    "seeds": ("stages.seeds", "seeds"),
    "datasets": ("stages.datasets", "datasets"),
    "defenses": ("stages.cli", "defenses_cmd"),
    "models": ("stages.cli", "models_cmd"),
}


def defenses_cmd() -> None:
    """List the registered defenses and which towers each trains."""
    from mmcoa.defenses import defense_class, list_defenses

    for name in list_defenses():
        cls = defense_class(name)
        typer.echo(f"{name}: trains {', '.join(cls.trains)}" + (" (needs the frozen original)" if cls.needs_original else ""))


def models_cmd() -> None:
    """List open_clip architectures (including the shipped tiny configs)."""
    from mmcoa.models import list_architectures

    typer.echo("\n".join(list_architectures()))


def _root() -> None:
    """Multimodal adversarial robustness for CLIP: train defenses (MMCoA, TeCoA, PMG-AFT, FARE) and
    measure robustness under image, text and multimodal attacks. Run the whole pipeline with `dvc repro`."""


def build_app(names: list[str] | None = None) -> typer.Typer:
    """The `mmcoa` app with the given commands (all by default), in COMMANDS' order."""
    app = typer.Typer(name="mmcoa", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
    app.callback()(_root)  # a group even when it holds one command: `mmcoa evaluate ...` keeps its name
    for name in names or COMMANDS:
        module, function = COMMANDS[name]
        app.command(name)(getattr(importlib.import_module(module), function))
    return app


def invoked_command(argv: list[str]) -> str | None:
    """The command named on a command line (its first word that is not an option), if it is one."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first if first in COMMANDS else None


def __getattr__(name: str):
    if name == "app":  # `from stages.cli import app`: every command
        return build_app()
    raise AttributeError(name)


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a user can fix (a bad param, a model or dataset that cannot be loaded), taken from
    the modules this process loaded: an error of a module never imported cannot have been raised."""
    errors: list[type[Exception]] = [StageError]
    for module, name in (("mmcoa.data.errors", "DataError"), ("mmcoa.models", "ModelLoadError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main() -> None:
    """Run the command on the command line; a user's error prints one line and exits 2."""
    from rich.markup import escape

    try:
        command = invoked_command(sys.argv[1:])
        build_app([command] if command else None)()
    except Exception as err:
        if not isinstance(err, user_errors()):
            raise
        message = " ".join(str(err).split())  # one line, whatever the message
        # escaped: paths and shapes may hold "[", which rich would read as markup
        console.print(f"[red]error[/]: {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(getattr(err, "code", 2))


if __name__ == "__main__":
    main()
