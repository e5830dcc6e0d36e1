"""The `mmcoa` command: one subcommand per pipeline stage, plus tools.

Stages (chained by dvc.yaml): fetch -> base -> baseline -> finetune -> evaluate -> report.
Tools: attack (one attack on a saved model), attacks/defenses/models (what is registered).
Errors a user can fix print one line and exit 2; a diverged training run exits 1.
"""

from __future__ import annotations

import sys

import typer

from stages.attack import attack
from stages.base import base
from stages.datasets import datasets
from stages.common import StageError, console
from stages.evaluate import baseline, evaluate
from stages.fetch import fetch, fetch_eval
from stages.finetune import finetune
from stages.report import report
from stages.seeds import seeds

app = typer.Typer(
    name="mmcoa",
    help="Multimodal adversarial robustness for CLIP: train defenses (MMCoA, TeCoA, PMG-AFT, FARE) and "
    "measure robustness under image, text and multimodal attacks. Run the whole pipeline with `dvc repro`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for command in (fetch, base, baseline, finetune, evaluate, attack, report, seeds, datasets):
    app.command()(command)
app.command("fetch-eval")(fetch_eval)


@app.command("defenses")
def defenses_cmd() -> None:
    """List the registered defenses and which towers each trains."""
    from mmcoa.defenses import defense_class, list_defenses

    for name in list_defenses():
        cls = defense_class(name)
        typer.echo(f"{name}: trains {', '.join(cls.trains)}" + (" (needs the frozen original)" if cls.needs_original else ""))


@app.command("models")
def models_cmd() -> None:
    """List open_clip architectures (including the shipped tiny configs)."""
    from mmcoa.models import list_architectures

    typer.echo("\n".join(list_architectures()))


def main() -> None:
    # A model or dataset that cannot be loaded is a user's error like a bad param: one line, exit 2.
    from rich.markup import escape

    from mmcoa.data import DataError
    from mmcoa.models import ModelLoadError

    try:
        app()
    except (StageError, ModelLoadError, DataError) as err:
        message = " ".join(str(err).split())  # one line, whatever the message
        # escaped: paths and shapes may hold "[", which rich would read as markup
        console.print(f"[red]error[/]: {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(getattr(err, "code", 2))


if __name__ == "__main__":
    main()
