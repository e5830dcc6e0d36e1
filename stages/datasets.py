"""`mmcoa datasets`: every registered dataset (classification and retrieval), whether its files are here,
how to get them, and every form of dataset reference the commands accept."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from mmcoa.data import DataError, dataset_spec, default_root, list_datasets
from mmcoa.data.registry import scheme_entries
from mmcoa.data.retrieval import list_retrieval_datasets, open_retrieval, read_retrieval_csv, read_retrieval_json
from stages.common import table_console

# How each scheme is written (its argument); the description is the first line of its opener's docstring.
SCHEME_FORMS = {"declared": "a mapping in evaluate.sources, inline YAML {csv: PATH, classnames: [...]}, or a .yaml file"}
RETRIEVAL_SCHEMES = [("retrieval-json", read_retrieval_json), ("retrieval-csv", read_retrieval_csv)]


def _classification_rows(root: Path) -> list[list[str]]:
    rows = []
    for name in list_datasets():
        spec = dataset_spec(name)
        present = spec.present(root)
        rows.append([
            name, "classification", "?" if spec.num_classes is None else str(spec.num_classes), ", ".join(spec.splits),
            "[green]yes[/]" if present else "[red]no[/]",
            "(installed package)" if spec.offline else escape(str(spec.folder(root))),
            "" if present else escape(spec.obtain),
        ])
    return rows


def _retrieval_rows() -> list[list[str]]:
    """Retrieval sets are described by opening them (from their default folders): present when they open,
    else the reason says where they were looked for and how to get them."""
    rows = []
    for name in list_retrieval_datasets():
        try:
            data = open_retrieval(name, "test")
            found, where, how = "[green]yes[/]", f"{len(data)} images, {data.n_captions} captions", ""
        except DataError as err:
            found, where, how = "[red]no[/]", "", escape(str(err))
        rows.append([name, "retrieval", "-", "test", found, where, how])
    return rows


def _first_line(entry) -> str:
    return ((entry.__doc__ or "").strip().splitlines() or [""])[0]


def datasets(
    root: Path = typer.Option(None, "--root", help="Raw-data folder (default: $MMCOA_DATA or ~/.cache/mmcoa)."),
) -> None:
    """List the registered datasets (classification and retrieval): classes, splits, where each is looked
    for, how to obtain it; then every other form a dataset can be given in."""
    root = root.expanduser() if root else default_root()
    out = table_console()
    table = Table(title=f"datasets (root: {escape(str(root))})")
    for column in ("name", "task", "classes", "splits", "present", "where", "how to obtain"):
        table.add_column(column, overflow="fold")
    for row in _classification_rows(root) + _retrieval_rows():
        table.add_row(*row)
    out.print(table)
    forms = Table(title="also accepted wherever a dataset is (--data, evaluate.datasets via evaluate.sources)")
    for column in ("reference", "what it reads"):
        forms.add_column(column, overflow="fold")
    for scheme, entry in [*scheme_entries(), *RETRIEVAL_SCHEMES]:
        forms.add_row(escape(SCHEME_FORMS.get(scheme, f"{scheme}:PATH")), escape(_first_line(entry)))
    forms.add_row("PATH (a folder)", "an evaluation subset prepared by `mmcoa fetch-eval NAME --out PATH`")
    out.print(forms)
