"""The CLI and the DVC pipeline, for real: a tiny `dvc repro` in a temporary git repository."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

PGD = {"attack": "pgd", "params": {"eps_255": 4, "steps": 3}}
WORD = {"attack": "word", "params": {"word_budget": 1, "k": 3}}
MM = {"attack": "multimodal", "params": {"mode": "co_attack", "image": PGD, "text": WORD}}
def _merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) and value else value
    return out


TINY_CHANGES = {  # on top of the repo's params.yaml: DVC needs every key that dvc.yaml lists
    "seed": 0,
    "device": "auto",
    "threads": 2,
    "zeroshot": {"templates": None},
    "data": {"dataset": "fashion_mnist", "root": "data/raw", "n_train": 1000},
    "base": {"model": {"arch": "mmcoa-test-micro"},
             "pretrain": {"datasets": {"fashion_mnist": 1000, "digits": 500, "fmnist_pairs": 500}, "steps": 40, "batch_size": 128}},
    "finetune": {
        "methods": ["mmcoa"],
        "steps": 2,
        "batch_size": 16,
        "checkpoint_every": 1,
        "image_attack": {"params": {"steps": 1}},
        "text_attack": {"params": {"word_budget": 1, "k": 3}},
    },
    "evaluate": {
        "datasets": ["fashion_mnist", "fmnist_pairs"],  # both tasks: classification and retrieval
        "models": {"outside": {"arch": "mmcoa-test-micro"}},  # any model reference, evaluated beside the pipeline's
        "n_samples": 40,
        "n_images": 12,
        "batch_size": 40,
        "n_examples": 3,
        "suite": [
            {"name": "image", **PGD},
            {"name": "text", **WORD},
            {"name": "multimodal", **MM},
            {"name": "apgd", "attack": "apgd_ce", "params": {"eps_255": 4, "steps": 5}, "worst_only": True},
        ],
        "retrieval_suite": [{"name": "image", **PGD}, {"name": "text", **WORD}, {"name": "multimodal", **MM}],
        "sweep": {"name": "sweep", "attack": "pgd", "params": {"steps": 2}},
        "sweep_eps_255": [2, 64],
    },
}
TINY = _merged(yaml.safe_load((REPO / "params.yaml").read_text()), TINY_CHANGES)


def cli_env(**extra: str) -> dict:
    """The environment of a `mmcoa` or `dvc` call: this venv first, offline, no analytics."""
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", **extra}


def run(args, cwd, check=True, **kw):
    out = subprocess.run(args, cwd=cwd, env=cli_env(), capture_output=True, text=True, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def make_repo(tmp_path: Path, params: dict) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("mmcoa", "stages"):
        shutil.copytree(REPO / item, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
    for item in ("dvc.yaml", ".dvcignore", "README.md"):
        shutil.copy(REPO / item, repo / item)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["git", "config", "user.email", "t@example.com"], repo)
    run(["git", "config", "user.name", "t"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "init"], repo)
    return repo


@pytest.mark.slow
def test_tiny_dvc_repro_produces_the_metric_contract(tmp_path):
    repo = make_repo(tmp_path, TINY)
    run(["dvc", "repro"], repo)
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    for model in ("base", "mmcoa", "outside"):
        for dataset in ("fashion_mnist",):
            for attack in ("clean", "image", "text", "multimodal", "worst_image", "worst_text", "worst_multimodal"):
                key = f"{model}.{dataset}.{attack}.acc"
                assert key in metrics, key
                assert 0.0 <= metrics[key] <= 1.0
        for attack in ("clean", "image", "text", "multimodal"):
            for direction in ("i2t", "t2i"):
                for k in (1, 5, 10):
                    assert f"{model}.fmnist_pairs.{attack}.{direction}_r{k}" in metrics
        outcomes = json.loads((repo / "evals" / model / "fashion_mnist" / "outcomes.json").read_text())
        assert len(outcomes["correct"]["worst_image"]) == 40
        # What the numbers were computed with (their last bits depend on it), as the params fixed it.
        runtime = json.loads((repo / "evals" / model / "fashion_mnist" / "result.json").read_text())["runtime"]
        assert runtime["device"] == "cpu" and runtime["threads"] == 2 and runtime["torch"] == torch.__version__
    report = (repo / "reports" / "report.md").read_text()
    assert report.startswith("# Robustness report")
    assert f"Computed with torch {torch.__version__} on cpu ({runtime['cpu_kernels']} kernels, 2 threads)." in report
    assert (repo / "reports" / "figures" / "sweep.png").stat().st_size > 1000
    # Nothing left to do, and a second repro runs nothing.
    status = run(["dvc", "status"], repo).stdout
    assert "changed" not in status and "modified" not in status, status
    again = run(["dvc", "repro"], repo).stdout
    assert "Running stage" not in again, again
    # Rerun from scratch, a fine-tuning gives the same bytes: every hash DVC recorded holds; the measured
    # seconds, which differ, live under timing/, outside every output. (An evaluation rerun gives the same
    # bytes too: tests/test_multimodal_evaluate.py, in one process, and the hand attack below.)
    lock = (repo / "dvc.lock").read_text()
    run(["dvc", "repro", "-f", "-s", "finetune@mmcoa"], repo)
    assert (repo / "dvc.lock").read_text() == lock
    assert json.loads((repo / "timing" / "models" / "mmcoa.json").read_text())["ledger"]["wall_s"] > 0
    assert json.loads((repo / "timing" / "evals" / "mmcoa" / "fashion_mnist.json").read_text())["cost"]["image"]["wall_s"] > 0
    # One attack by hand on the pipeline's base model: its clean accuracy is the pipeline's on the same
    # samples, the attack lowers it, and the result says what it was computed with.
    run([str(BIN / "mmcoa"), "attack", "--model", "models/base", "--attack", "pgd", "-a", "eps_255=4", "-a", "steps=3",
         "--data", "data/eval/fashion_mnist", "--out", str(tmp_path / "attack.json")], repo)
    single = json.loads((tmp_path / "attack.json").read_text())
    assert single["clean_acc"] == metrics["base.fashion_mnist.clean.acc"] and single["n"] == 40
    assert single["robust_acc"] < single["clean_acc"]
    assert single["runtime"] == runtime
    # An experiment with a changed param is listed with its metrics (dropping the outside model reruns
    # only what depends on it: nothing but the report).
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline run"], repo)
    out = run(["dvc", "exp", "run", "-S", "evaluate.models={}", "-n", "no-outside"], repo).stdout
    assert "Running stage 'evaluate@" not in out and "Running stage 'finetune@" not in out, out
    shown = run(["dvc", "exp", "show", "--json"], repo).stdout
    assert "no-outside" in shown and "mmcoa.fashion_mnist.multimodal.acc" in shown


def test_bad_params_exit_2_and_write_nothing(tmp_path):
    cases = {
        "unknown key": ({"finetune": {"lrr": 1}}, "finetune.lrr"),
        "wrong type": ({"finetune": {"steps": "many"}}, "finetune.steps"),
        "out of range": ({"data": {"n_train": -5}}, "data.n_train"),
        "unknown dataset": ({"evaluate": {"datasets": ["fashion_mnist", "imagenett"]}}, "evaluate.datasets[1]"),
        "unknown attack param": ({"evaluate": {"suite": [{"name": "image", "attack": "pgd", "params": {"epz": 1}}]}}, "epz"),
        "unknown defense": ({"finetune": {"methods": ["nope"]}}, "finetune.methods"),
    }
    # Every stage validates params through the same function (stages.common.load, whose StageError the
    # command prints as one line with exit 2): each case through it, the first and the last also through
    # two stages' commands, at once, since each run is mostly start-up time.
    from stages.common import StageError, load

    fetch = ["fetch", "--out", str(tmp_path / "out")]
    finetune = ["finetune", "--method", "mmcoa", "--out", str(tmp_path / "out")]
    env = cli_env(OMP_WAIT_POLICY="PASSIVE")  # processes side by side on two cores: idle threads sleep
    started = []
    for i, (label, (tree, key)) in enumerate(cases.items()):
        path = tmp_path / f"{label.replace(' ', '_')}.yaml"
        path.write_text(yaml.safe_dump(tree))
        with pytest.raises(StageError) as err:
            load(path)
        assert key in str(err.value) and len(str(err.value).splitlines()) == 1, (label, err.value)
        for stage in {0: [fetch], len(cases) - 1: [finetune]}.get(i, []):
            proc = subprocess.Popen(["mmcoa", *stage, "--params", str(path)], cwd=tmp_path, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            started.append((label, key, proc))
    for label, key, proc in started:
        _, stderr = proc.communicate()
        assert proc.returncode == 2, (label, stderr)
        assert key in stderr, (label, stderr)
        assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "out").exists()


def test_attack_list_and_cli_help(tmp_path):
    env = cli_env(OMP_WAIT_POLICY="PASSIVE")  # both at once: each is mostly start-up time
    listing, helped = (subprocess.Popen(["mmcoa", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True) for args in (["attack", "--list"], ["--help"]))
    out, err = listing.communicate()
    assert listing.returncode == 0, err
    for name in ("pgd", "word", "multimodal"):
        assert name in out
    out, err = helped.communicate()
    assert helped.returncode == 0 and "finetune" in out, err


def test_a_command_imports_only_its_own_module():
    """Start-up: `mmcoa fetch-eval` loads neither open_clip nor scikit-learn nor matplotlib, which would
    cost each stage process seconds it does not need."""
    code = ("import sys; from stages.cli import build_app; build_app(['fetch-eval']); "
            "print(sorted(m for m in ('open_clip', 'sklearn', 'matplotlib') if m in sys.modules))")
    # every command (as `mmcoa --help` builds it): the probe sees them; both probes at once
    one, every = (subprocess.Popen([sys.executable, "-c", c], cwd=REPO, stdout=subprocess.PIPE, text=True,
                                   env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
                  for c in (code, code.replace("['fetch-eval']", "None")))
    assert one.communicate()[0].strip() == "[]" and one.returncode == 0
    out = every.communicate()[0]
    assert every.returncode == 0 and "'open_clip'" in out and "'matplotlib'" in out, out


# --- DVC dependencies cover the code each stage runs ------------------------------------------

# Params validation looks names up in every registry (attacks, defenses, datasets): it can refuse params but
# never changes a stage's outputs, so the modules it alone reaches are not dependencies of every stage.
PARAM_CHECKS = {"_check_registered"}


def _project_imports(path: Path) -> set[str]:
    """Project modules ``path`` imports, at top level or inside functions (lazy imports count)."""
    package = ".".join(path.relative_to(REPO).parts[:-1])
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_FunctionDef(self, node):
            if node.name not in PARAM_CHECKS:
                self.generic_visit(node)

        def visit_If(self, node):
            # `if TYPE_CHECKING:` imports are for annotations only and never run
            if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
            else:
                self.generic_visit(node)

        def visit_Import(self, node):
            found.update(a.name for a in node.names)

        def visit_ImportFrom(self, node):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)

    Visitor().visit(ast.parse(path.read_text()))
    return {m for m in found if m.split(".")[0] in ("mmcoa", "stages")}


def _module_file(module: str) -> Path | None:
    for candidate in (REPO / (module.replace(".", "/") + ".py"), REPO / module.replace(".", "/") / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _code_closure(module: str) -> set[str]:
    """Every project file that running ``module`` can import (packages' __init__ files included)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))] + sorted(_project_imports(path))
    return {p.relative_to(REPO).as_posix() for p in seen}


def test_every_stage_depends_on_the_code_it_runs():
    """A change to any module a stage imports must rerun that stage: dvc.yaml lists it (or its folder)."""
    from stages.cli import COMMANDS

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert {"fetch", "base", "finetune", "evaluate", "report"} <= set(stages)
    for name, stage in stages.items():
        command = stage["cmd"].split()[1]
        deps = stage.get("deps", [])
        missing = [f for f in sorted(_code_closure(COMMANDS[command][0]))
                   if not f.endswith("__init__.py") and not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)]
        assert not missing, f"stage {name} runs {missing} but does not depend on them"
