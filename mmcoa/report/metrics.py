"""The flat metrics files DVC reads: every number, the headline subset, the eps sweep."""

from __future__ import annotations


from mmcoa.report.collection import Collection, HEADLINE, worst_name


def flat_metrics(col: Collection) -> dict[str, float]:
    """Every metric, ``<model>.<dataset>.<attack>.<metric>``, sorted: the full DVC metrics file."""
    out = {f"{e.model}.{k}": v for e in col.evals for k, v in e.metrics.items()}
    return dict(sorted(out.items()))


def headline_metrics(col: Collection) -> dict[str, float]:
    """The small file for `dvc exp show`: per model, held-out averages and the fine-tuning set's headline.

    ``<model>.heldout.clean`` and ``<model>.heldout.worst_<family>`` average over the held-out
    zero-shot classification sets; ``<model>.<ftdataset>.{clean,image,text,multimodal}``.
    """
    out: dict[str, float] = {}
    for model in col.models:
        for attack in ["clean"] + [worst_name(f) for f in col.families()]:
            mean = col.heldout_mean(model, attack)
            if mean is not None:
                out[f"{model}.heldout.{attack}"] = round(mean[0], 6)
        for d in col.finetune:
            e = col.get(model, d)
            for attack in HEADLINE:
                if e is not None and e.acc(attack) is not None:
                    out[f"{model}.{d}.{attack}"] = e.acc(attack)
    return dict(sorted(out.items()))


def sweep_rows(col: Collection) -> list[dict]:
    """The eps sweeps as one list of rows (``dvc plots``)."""
    return [{"model": e.model, "dataset": e.dataset, **row} for e in col.evals for row in e.result.get("sweep", [])]
