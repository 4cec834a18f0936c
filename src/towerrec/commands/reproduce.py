"""``towerrec-reproduce``: the reported table, end to end, in one command.

Prepare the data, score the baselines with ``towerrec-eval``'s :func:`~towerrec.commands.evaluate.evaluate`, train
every experiment with every seed through ``towerrec-train``'s :func:`~towerrec.commands.train.train`, then write one
table of every model on the test split: trained models as mean ± sample standard deviation over seeds,
headed by the data hash, the git commit, the wall time, the split and the seeds.

Writes into ``out_dir``::

    reproduce.md             the header and the table (slices x models, metrics at ``k``)
    reproduce.json           a results record (kind ``reproduce``): the header, and per model every
                             slice's metrics (mean and std over seeds), intervals and paired tests
    baselines/               towerrec-eval's metrics.json and metrics.md (one folder per baseline)
    runs/<name>/seed<s>/     towerrec-train's run folders (resolved config, checkpoints, metrics.json,
                             test_per_user.parquet)

Beside mean ± std over seeds, every model gets a 95% bootstrap interval over the test users of its recall
and NDCG in the item slices: for a trained model each user's values are averaged over the seeds first, so
the interval is about the users sampled, given the seeds run. Every model is also compared with the best
baseline (by Recall@k of ``all``), paired over the test users: the mean difference and a sign-flip
p-value, marked better, worse or not distinguishable at 0.05.

This module runs; :mod:`towerrec.evaluation.report` formats the tables and reads results back
(:func:`~towerrec.evaluation.report.load_results`, which the evaluation notebook uses).
"""

from __future__ import annotations

import gc
import logging
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from towerrec import CONFIG_DIR, PROJECT_ROOT
from towerrec.backtest import is_rolling, pooled_manifest, prepare_folds
from towerrec.commands.common import hydra_cli
from towerrec.data.build import config_hash, ensure_prepared, read_manifest
from towerrec.data.schema import DataError
from towerrec.evaluation.per_user import per_user_name
from towerrec.evaluation.report import (
    Slices,
    best_baseline,
    compare_to_baseline,
    duration,
    format_fold_table,
    format_header,
    format_reproduce_table,
    interval_pairs,
    mean_std,
    pooled_intervals,
    pooled_per_user,
    read_baseline_per_user,
)
from towerrec.evaluation.results import ModelResult, Results
from towerrec.evaluation.stats import ALPHA, N_FLIPS

log = logging.getLogger(__name__)


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` inside the running Hydra app (the CLI) or outside it (tests)."""
    if GlobalHydra.instance().is_initialized():  # towerrec-reproduce's app already searches CONFIG_DIR
        return compose(config_name=config_name, overrides=overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def run_overrides(name: str, variants: DictConfig | dict) -> list[str]:
    """The overrides of one named training run: a variant's list, or ``experiment=<name>``."""
    if name in variants:
        return list(variants[name])
    if not (Path(CONFIG_DIR) / "experiment" / f"{name}.yaml").is_file():
        raise ValueError(
            f"unknown experiment {name!r}: neither a variant in configs/reproduce.yaml "
            f"({', '.join(variants)}) nor configs/experiment/{name}.yaml"
        )
    return [f"experiment={name}"]


def baseline_overrides(baselines: str | list[str] | None) -> list[str]:
    """Eval-config overrides selecting ``all``, one, or a list of ``configs/baseline`` options."""
    if not baselines:
        return []
    if isinstance(baselines, str):
        return [f"baseline={baselines}"]
    # One entry per name under baseline.<name>, the layout of configs/baseline/all.yaml.
    return [f"+baseline@baseline.{name}={name}" for name in baselines]


def git_state(root: Path = PROJECT_ROOT) -> dict:
    """The commit checked out at ``root`` and whether the working tree differs from it (read-only calls)."""

    def git(*args: str) -> subprocess.CompletedProcess:
        cmd = ["git", "--no-optional-locks", "-C", str(root), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    try:
        head, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("git unavailable (%s): the commit is reported as unknown", err)
        return {"commit": "unknown", "dirty": None}
    if head.returncode != 0:
        return {"commit": "unknown", "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def data_fingerprint(manifest: dict) -> dict:
    """What identifies the processed data: the manifest's config hash and the inputs' SHA-256s.

    A folder of images is fingerprinted by the prepare step from its listing (names, sizes, mtimes), not
    its contents; a generated source (synthetic) has generator parameters instead of input files.
    """
    inputs, generator = {}, {}
    for key, value in manifest["sources"].items():
        if isinstance(value, dict) and "sha256" in value:
            inputs[key] = {"sha256": value["sha256"], "bytes": value["bytes"], "folder": "files" in value}
        else:
            generator[key] = value
    return {
        "name": manifest["name"],
        "config_hash": manifest["config_hash"],
        "inputs": inputs,
        "generator": generator,
        "counts": manifest["counts"],
    }


def _command() -> str | None:
    """The reproduce command line when run by Hydra, for the header."""
    if not HydraConfig.initialized():
        return None
    return " ".join(["towerrec-reproduce", *HydraConfig.get().overrides.task])


def compose_runs(cfg: DictConfig, out: Path, ks: list[int]) -> list[tuple[str, int, DictConfig]]:
    """The train config of every (experiment, seed), its output folder under ``out/runs``.

    Overrides apply in this order: ``train_overrides``, the reported cut-offs, the optional time cap, the
    experiment's own (so an ablation's ``...image_encoder=null`` wins over a size override), the seed.
    """
    common = [*cfg.train_overrides, f"model.ks=[{','.join(map(str, ks))}]"]
    if cfg.run_max_time:
        common.append(f"++trainer.max_time='{cfg.run_max_time}'")
    runs = []
    for name in cfg.experiments:
        for seed in cfg.seeds:
            run_dir = out / "runs" / name / f"seed{seed}"
            own = run_overrides(name, cfg.variants)
            overrides = [*common, *own, f"seed={seed}", f"paths.output_dir='{run_dir}'"]
            runs.append((name, int(seed), compose_config("train", overrides)))
    return runs


def run_baselines(cfg: DictConfig, train_cfg: DictConfig, out: Path, ks: list[int]) -> dict[str, Slices]:
    """``towerrec-eval`` on the test split for ``cfg.baselines``, on ``train_cfg``'s data; writes into ``out``."""
    from towerrec.commands.evaluate import (
        evaluate,  # here, so that reading results back does not load Lightning
    )

    baselines = OmegaConf.to_object(cfg.baselines) if OmegaConf.is_list(cfg.baselines) else cfg.baselines
    overrides = [
        *baseline_overrides(baselines),
        "split=test",
        f"ks=[{','.join(map(str, ks))}]",
        f"out_dir='{out}'",
        f"paths.output_dir='{out}'",
        *cfg.eval_overrides,
    ]
    eval_cfg = compose_config("eval", overrides)
    with open_dict(eval_cfg):  # the exact data and DataModule configs that the models train on
        eval_cfg.data = OmegaConf.create(OmegaConf.to_container(train_cfg.data, resolve=True))
        eval_cfg.datamodule = OmegaConf.create(OmegaConf.to_container(train_cfg.datamodule, resolve=True))
        eval_cfg.workers = train_cfg.workers
    return evaluate(eval_cfg)


def compare_models(
    models: dict[str, ModelResult], per_user: dict[str, pd.DataFrame], metric: str, slices: list[str]
) -> dict | None:
    """Pair every model with the best baseline by ``metric`` of ``all``; sets ``details["vs_best"]``.

    Returns:
        What the header says about the tests (the baseline, metric, flips, level), or None without a
        baseline.
    """
    best = best_baseline(models, metric)
    if best is None or best not in per_user:
        return None
    for name, slices_diff in compare_to_baseline(per_user, best, metric, slices, n_flips=N_FLIPS).items():
        models[name].details["vs_best"] = slices_diff
    return {"baseline": best, "metric": metric, "flips": N_FLIPS, "alpha": ALPHA}


@dataclass
class Plan:
    """What :func:`validate` settles before anything runs: the cut-offs, the output folder and every
    (experiment, seed) train config, with the commit and the command line for the header."""

    ks: list[int]
    out: Path
    runs: list[tuple[str, int, DictConfig]]
    git: dict
    command: str | None
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def first(self) -> DictConfig:
        """The first run's config: its data and DataModule are every run's (checked by :func:`validate`)."""
        return self.runs[0][2]


def validate(cfg: DictConfig) -> Plan:
    """Check the options and compose every run: a typo or a mix of data sets fails now, not after an hour
    of training."""
    started = time.perf_counter()
    ks = sorted(int(k) for k in cfg.ks)
    if not cfg.experiments or not cfg.seeds:
        raise ValueError("experiments and seeds must each name at least one entry")
    if cfg.k not in ks:
        raise ValueError(f"k={cfg.k} must be one of ks={ks}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = compose_runs(cfg, out, ks)
    hashes = {name: config_hash(run_cfg.data) for name, _, run_cfg in runs}
    if len(set(hashes.values())) > 1:
        raise ValueError(f"the experiments must share one data config, got config hashes {hashes}")
    return Plan(ks, out, runs, git_state(), _command(), started)


def prepare(plan: Plan) -> dict:
    """Prepare the runs' data (every fold's folder for a rolling backtest); return its manifest (pooled
    over the folds for a backtest: the table is pooled over (fold, user) pairs)."""
    t = time.perf_counter()
    first = plan.first
    if is_rolling(first.data):
        manifest = pooled_manifest(prepare_folds(first.data, workers=first.workers))
    else:
        ensure_prepared(first.data, workers=first.workers)
        manifest = read_manifest(first.data.processed_dir)
    plan.timings["prepare"] = time.perf_counter() - t
    return manifest


def score_baselines(cfg: DictConfig, plan: Plan) -> dict[str, Slices]:
    """``towerrec-eval`` of ``cfg.baselines`` on the test split, into ``<out>/baselines`` (none: {})."""
    if not cfg.baselines:
        return {}
    t = time.perf_counter()
    baselines = run_baselines(cfg, plan.first, plan.out / "baselines", plan.ks)
    plan.timings["baselines"] = time.perf_counter() - t
    return baselines


def train_all(cfg: DictConfig, plan: Plan, manifest: dict) -> dict[str, list[dict]]:
    """Train every (experiment, seed) through ``towerrec-train``; each run's seed, folder, seconds, val and
    test slices, by experiment. Warns after the first run when the whole would exceed the budget."""
    from towerrec.commands.train import train  # here, so that reading results back does not load Lightning

    trained: dict[str, list[dict]] = {}
    for i, (name, seed, run_cfg) in enumerate(plan.runs):
        log.info("training %s, seed %d (run %d of %d)", name, seed, i + 1, len(plan.runs))
        t = time.perf_counter()
        results = train(run_cfg)
        seconds = time.perf_counter() - t
        if results.data["config_hash"] != manifest["config_hash"]:
            raise RuntimeError(f"{name} seed {seed} trained on other data than the table's: {results.data}")
        run_dir = str(Path(run_cfg.paths.output_dir).relative_to(plan.out))
        run = {"seed": seed, "dir": run_dir, "seconds": round(seconds, 1), "val": results.val, "test": results.scores()}
        trained.setdefault(name, []).append(run)
        elapsed = time.perf_counter() - plan.started
        if i == 0 and elapsed + seconds * (len(plan.runs) - 1) > 60 * cfg.budget_minutes:
            log.warning(
                "at %.0f s per run, %d runs exceed the %d min budget: shorten the schedule (train_overrides) "
                "or set run_max_time",
                seconds,
                len(plan.runs),
                cfg.budget_minutes,
            )
        gc.collect()  # one model at a time in memory
    plan.timings["training"] = sum(r["seconds"] for rs in trained.values() for r in rs)
    return trained


def aggregate(
    cfg: DictConfig, plan: Plan, trained: dict[str, list[dict]], baselines: dict[str, Slices]
) -> tuple[dict[str, ModelResult], dict[str, pd.DataFrame], dict | None]:
    """Every model's table entry: trained models as mean and std over seeds with intervals over users
    (each user's values averaged over the seeds first), baselines as scored; then the paired tests
    against the best baseline.

    Returns:
        The models, each model's per-user test table (a trained one's over seeds), and what the header
        says about the paired tests (None without a baseline).
    """
    models: dict[str, ModelResult] = {}
    per_user: dict[str, pd.DataFrame] = {}
    for name, rs in trained.items():
        mean, std = mean_std([r.pop("test") for r in rs])
        frames = [plan.out / r["dir"] / per_user_name("test") for r in rs]
        interval = {}
        if all(f.is_file() for f in frames):
            tables = [pd.read_parquet(f) for f in frames]
            interval = pooled_intervals(tables, plan.ks)
            per_user[name] = pooled_per_user(tables)
        details = {"overrides": run_overrides(name, cfg.variants), "seeds": [r["seed"] for r in rs], "runs": rs}
        models[name] = ModelResult("trained", mean, std, interval, details)
    for name, slices in baselines.items():
        models.setdefault(name, ModelResult("baseline", slices, interval=interval_pairs(slices)))
        per_user.setdefault(name, read_baseline_per_user(plan.out / "baselines", name))
    comparison = compare_models(models, per_user, f"recall@{cfg.k}", list(cfg.slices))
    return models, per_user, comparison


def make_header(cfg: DictConfig, plan: Plan, manifest: dict, models: dict[str, ModelResult], comparison: dict | None) -> dict:
    """The header of the table: data fingerprint, commit, wall time and steps, split, seeds, experiments."""
    wall = time.perf_counter() - plan.started
    if wall > 60 * cfg.budget_minutes:
        log.warning("the reproduction took %s, over the %d min budget", duration(wall), cfg.budget_minutes)
    return {
        "data": data_fingerprint(manifest),
        "git": plan.git,
        "wall_seconds": round(wall, 1),
        "budget_minutes": cfg.budget_minutes,
        "timings_seconds": {key: round(value, 1) for key, value in plan.timings.items()},
        "split": {"name": "test", **manifest["split"]},
        "seeds": [int(s) for s in cfg.seeds],
        "k": cfg.k,
        "ks": plan.ks,
        "experiments": {name: m.details["overrides"] for name, m in models.items() if m.role == "trained"},
        "comparison": comparison,
        "train_overrides": list(cfg.train_overrides),
        "command": plan.command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }


def render(record: Results, per_user: dict[str, pd.DataFrame], slices: list[str], out: Path) -> str:
    """Write ``reproduce.json`` (the record) and ``reproduce.md`` (the header, the table and, for a
    rolling backtest, Recall@k per fold); return the markdown."""
    header = record.header
    record.write(out / "reproduce.json")
    comparison = header["comparison"]
    vs = comparison["baseline"] if comparison else None
    text = f"{format_header(header)}\n\n{format_reproduce_table(record.models, slices, header['k'], vs)}\n"
    if header["split"]["method"] == "rolling":
        folds = format_fold_table(per_user, f"recall@{header['k']}", header["split"])
        text += f"\n## Per fold: Recall@{header['k']} of `all` (evaluated users)\n\n{folds}\n"
    (out / "reproduce.md").write_text(text)
    return text


def reproduce(cfg: DictConfig) -> Results:
    """Validate, prepare, score the baselines, train experiments x seeds, aggregate, and render
    ``reproduce.md`` and ``reproduce.json``.

    Returns:
        The ``reproduce`` record written to ``reproduce.json``: the header, and per model its slices
        (mean over seeds), std, intervals and details.
    """
    plan = validate(cfg)
    manifest = prepare(plan)
    baselines = score_baselines(cfg, plan)
    trained = train_all(cfg, plan, manifest)
    models, per_user, comparison = aggregate(cfg, plan, trained, baselines)
    header = make_header(cfg, plan, manifest, models, comparison)
    data = {"name": manifest["name"], "config_hash": manifest["config_hash"], "split": manifest["split"]}
    record = Results("reproduce", "test", data, models, header=header)
    text = render(record, per_user, list(cfg.slices), plan.out)
    print(f"\n{text}\nwritten: {plan.out / 'reproduce.md'}, {plan.out / 'reproduce.json'}")
    return record


main = hydra_cli("reproduce", reproduce, (DataError,))


if __name__ == "__main__":
    main()
