"""`mmcoa datasets`: every registered dataset, whether its files are here, and how to get them."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from mmcoa.data import dataset_spec, default_root, list_datasets, list_schemes


def datasets(
    root: Path = typer.Option(None, "--root", help="Raw-data folder (default: $MMCOA_DATA or ~/.cache/mmcoa)."),
) -> None:
    """List the registered datasets: classes, splits, where each is looked for, and how to obtain it."""
    root = root.expanduser() if root else default_root()
    table = Table(title=f"datasets (root: {root})")
    for column in ("name", "classes", "splits", "present", "where", "how to obtain"):
        table.add_column(column, overflow="fold")
    for name in list_datasets():
        spec = dataset_spec(name)
        present = spec.present(root)
        table.add_row(
            name,
            "?" if spec.num_classes is None else str(spec.num_classes),
            ", ".join(spec.splits),
            "[green]yes[/]" if present else "[red]no[/]",
            "(installed package)" if spec.offline else str(spec.folder(root)),
            "" if present else spec.obtain,
        )
    out = Console()
    out.print(table)
    out.print("Also valid wherever a dataset name is: " + ", ".join(f"{s}:PATH" for s in list_schemes())
              + " (see `python -c 'import mmcoa.data.local as m; help(m)'`).", highlight=False)
