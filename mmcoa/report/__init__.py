"""Turn evaluation results into the report a reviewer can check: tables with 95% intervals, the
worst case per attack family, paired tests behind every finding, flat metrics and figures.

Input: one :class:`Evaluation` per (model, dataset), built by :func:`load_evaluation` from the dicts
of an evaluation's ``result.json`` and ``outcomes.json`` (per-sample 0/1 outcomes per attack).
Every number the report states is read or derived from them; a comparison is stated as a finding
only when its paired test on the same samples (exact McNemar; an image-level sign-flip test for an
image's captions) is rejected by Holm's correction over all the report's tests, in report and README alike.
Nothing here reads pipeline files or knows about the terminal.

Modules: ``collection`` (the evaluations, checked), ``format`` (how numbers are written), ``metrics``
(DVC's metrics files), ``findings`` (paired tests, threat models trained on, gradient-masking flags),
``markdown`` (report and README summary), ``compute`` (robustness against training compute, the
evaluation's cost per attack, the measured seconds apart), ``seeds`` (spread across seeds), ``figures``
(matplotlib, imported only when a figure is drawn).
"""

from __future__ import annotations

from mmcoa.report.collection import (  # noqa: F401
    ALPHA,
    BLACK_BOX,
    Collection,
    Evaluation,
    FAMILY_ORDER,
    HEADLINE,
    LABELS,
    MODEL_ORDER,
    RETRIEVAL_COLUMNS,
    ReportError,
    label,
    load_evaluation,
    worst_name,
)
from mmcoa.report.format import budget, cell, p_text, pct  # noqa: F401
from mmcoa.report.compute import (  # noqa: F401
    ComputeRow,
    compute_markdown,
    compute_rows,
    evaluation_costs,
    robustness_attack,
    timing_markdown,
    training_ledger,
)
from mmcoa.report.metrics import flat_metrics, headline_metrics, sweep_rows  # noqa: F401
from mmcoa.report.findings import (  # noqa: F401
    Comparison,
    compare,
    defense_verdicts,
    finding,
    findings_markdown,
    holm_statement,
    masking_flags,
    masking_markdown,
    no_difference,
    pairs,
    scopes,
    self_transfer,
    trained_status,
    training_markdown,
    transfer_markdown,
    unpaired,
)
from mmcoa.report.markdown import (  # noqa: F401
    TEXT_RULE,
    accuracy_table,
    recall_cell,
    render_markdown,
    render_summary,
    retrieval_markdown,
    splice_summary,
    text_rule_markdown,
)
from mmcoa.report.seeds import Run, seed_runs, seeds_markdown  # noqa: F401

_FIGURES = ('overview_columns', 'save_accuracy_figure', 'save_compute_figure', 'save_examples_figure',
            'save_overview_figure', 'save_sweep_figure')


def __getattr__(name: str):
    """Figure functions load matplotlib on first use: a report without figures never imports it."""
    if name in _FIGURES:
        from mmcoa.report import figures

        return getattr(figures, name)
    raise AttributeError(name)
