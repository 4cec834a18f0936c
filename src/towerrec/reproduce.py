"""``towerrec-reproduce``: the reported table, end to end, in one command.

Prepare the data, score the baselines with ``towerrec-eval``'s :func:`~towerrec.evaluate.evaluate`, train
every experiment with every seed through ``towerrec-train``'s :func:`~towerrec.train.train`, then write one
table of every model on the test split: trained models as mean ± sample standard deviation over seeds,
headed by the data hash, the git commit, the wall time, the split and the seeds.

Writes into ``out_dir``::

    reproduce.md             the header and the table (slices x models, metrics at ``k``)
    reproduce.json           the header, and per model every slice's metrics (mean and std over seeds)
    baselines/               towerrec-eval's metrics.json and metrics.md (one folder per baseline)
    runs/<name>/seed<s>/     towerrec-train's run folders (resolved config, checkpoints, metrics.json,
                             test_per_user.parquet)

Beside mean ± std over seeds, every model gets a 95% bootstrap interval over the test users of its recall
and NDCG in the item slices: for a trained model each user's values are averaged over the seeds first, so
the interval is about the users sampled, given the seeds run.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path

import hydra
import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from towerrec import CONFIG_DIR, PROJECT_ROOT
from towerrec.data.prepare import config_hash, ensure_prepared, read_manifest
from towerrec.evaluation.evaluator import ITEM_SLICES, intervals

log = logging.getLogger(__name__)

Slices = dict[str, dict[str, float]]

#: Metrics of the table, at ``cfg.k``; coverage exists for the ``all`` slice only.
TABLE_METRICS = [("recall", "Recall"), ("ndcg", "NDCG"), ("mrr", "MRR"), ("coverage", "coverage")]


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


def mean_std(runs: list[Slices]) -> tuple[Slices, Slices]:
    """Mean and sample standard deviation of every slice's metrics over runs (NaN where undefined)."""
    mean: Slices = {}
    std: Slices = {}
    for sl in dict.fromkeys(s for run in runs for s in run):
        names = dict.fromkeys(m for run in runs for m in run.get(sl, {}))
        mean[sl], std[sl] = {}, {}
        for m in names:
            values = [run.get(sl, {}).get(m) for run in runs]
            values = [math.nan if v is None else float(v) for v in values]
            mean[sl][m] = statistics.fmean(values)
            std[sl][m] = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std


def pooled_intervals(frames: list[pd.DataFrame], ks: list[int]) -> dict[str, dict[str, list[float]]]:
    """95% bootstrap intervals over users of each user's metric averaged over runs (seeds).

    Args:
        frames: one ``test_per_user.parquet`` table per run (``user_idx`` and ``<slice>/<metric>@k``).
        ks: cut-offs.

    Returns:
        ``{slice: {metric@k: [low, high]}}`` for :data:`ITEM_SLICES` x ``evaluator.INTERVAL_METRICS``.
    """
    per_user = pd.concat(frames).groupby("user_idx").mean()  # NaN (no target in the slice) stays NaN
    slices: Slices = {}
    for sl in ITEM_SLICES:
        values = {
            col.split("/", 1)[1]: torch.tensor(per_user[col].to_numpy(dtype="float64"))
            for col in per_user
            if col.startswith(f"{sl}/")
        }
        if values:
            slices[sl] = intervals(values, ks)
    return interval_pairs(slices)


def interval_pairs(slices: Slices) -> dict[str, dict[str, list[float]]]:
    """``{slice: {metric@k: [low, high]}}`` from the ``recall_lo@k``, ``recall_hi@k``... keys that
    :func:`~towerrec.evaluation.evaluator.intervals` writes (a baseline's slices carry them too)."""
    out: dict[str, dict[str, list[float]]] = {}
    for sl, values in slices.items():
        for key, lo in values.items():
            if "_lo@" in key:
                metric, k = key.split("_lo@")
                out.setdefault(sl, {})[f"{metric}@{k}"] = [lo, values.get(f"{metric}_hi@{k}", math.nan)]
    return out


def _interval_cell(interval: list[float] | None) -> str:
    if not interval or any(v is None or v != v for v in interval):
        return "–"
    return f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def _cell(value: float | None, std: float | None) -> str:
    if value is None or value != value:
        return "–"
    if std is None or std != std:
        return f"{value:.4f}"
    return f"{value:.4f} ± {std:.4f}"


def format_reproduce_table(models: dict[str, dict], slices: list[str], k: int) -> str:
    """A markdown table: one row per (slice, model), the metrics at ``k``, ``mean ± std`` where known, and
    the 95% interval of Recall@k over users."""
    cols = [f"{label}@{k}" for _, label in TABLE_METRICS] + [f"Recall@{k} 95% interval"]
    lines = ["| slice | model | users | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
    for sl in slices:
        for name, model in models.items():
            values = model["metrics"].get(sl)
            if values is None:
                continue
            stds = model.get("std", {}).get(sl, {})
            cells = [_cell(values.get(f"{m}@{k}"), stds.get(f"{m}@{k}")) for m, _ in TABLE_METRICS]
            cells.append(_interval_cell(model.get("interval", {}).get(sl, {}).get(f"recall@{k}")))
            users = values.get("users")
            users = "" if users is None or users != users else int(users)
            lines.append(f"| {sl} | {name} | {users} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def format_header(header: dict) -> str:
    """The markdown lines above the table: data, commit, wall time, split, seeds, runs."""
    data, git, split = header["data"], header["git"], header["split"]
    lines = [
        f"# Reproduction: {data['name']}, {split['name']} split, full ranking",
        "",
        f"- **data hash** (manifest config_hash): `{data['config_hash']}`",
    ]
    for path, inp in data["inputs"].items():
        kind = "listing sha256" if inp["folder"] else "sha256"
        lines.append(f"  - `{Path(path).name}` {kind} `{inp['sha256']}` ({inp['bytes']:,} bytes)")
    if data["generator"]:
        params = ", ".join(f"{key}={value}" for key, value in data["generator"].items())
        lines.append(f"  - generated: {params}")
    dirty = {True: " (dirty: uncommitted changes)", False: "", None: ""}[git["dirty"]]
    lines.append(f"- **commit**: `{git['commit']}`{dirty}")
    env = header["environment"]
    over = " — over budget" if header["wall_seconds"] > 60 * header["budget_minutes"] else ""
    steps = ", ".join(f"{step} {_duration(sec)}" for step, sec in header["timings_seconds"].items())
    lines.append(
        f"- **wall time**: {_duration(header['wall_seconds'])} ({steps}; budget {header['budget_minutes']} min{over}); "
        f"{env['torch_threads']} torch threads, torch {env['torch']}, python {env['python']}"
    )
    details = ", ".join(f"{key} {value}" for key, value in split.items() if key not in ("name", "method"))
    lines.append(f"- **split**: {split['method']}" + (f" ({details})" if details else ""))
    lines.append(
        f"- **seeds**: {', '.join(map(str, header['seeds']))} — trained models: mean ± sample std over seeds; "
        "baselines: one run"
    )
    for name, overrides in header["experiments"].items():
        lines.append(f"  - `{name}`: `{' '.join(overrides)}`")
    lines.append(
        "- **intervals**: 95% percentile bootstrap over the test users (1,000 resamples), of each user's "
        "value averaged over the seeds for a trained model"
    )
    n_items = data["counts"].get("items")
    if n_items:
        lines.append(
            f"- **chance level**: a random ranking of all {n_items:,} items has an expected Recall@{header['k']} "
            f"of {header['k']} / {n_items:,} = {header['k'] / n_items:.4f} (without seen-item masking)"
        )
    if header["train_overrides"]:
        lines.append(f"- **every training run**: `{' '.join(header['train_overrides'])}`")
    if header.get("command"):
        lines.append(f"- **command**: `{header['command']}`")
    return "\n".join(lines)


def _json_safe(value):
    """NaN as null, recursively (a slice without users has NaN metrics)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


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
    from towerrec.evaluate import evaluate  # here, so that reading results back does not load Lightning

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


def reproduce(cfg: DictConfig) -> dict:
    """Prepare, score the baselines, train experiments x seeds, write ``reproduce.md`` and ``reproduce.json``.

    Returns:
        The contents of ``reproduce.json``: ``{"header": {...}, "models": {name: {"kind", "metrics", ...}}}``.
    """
    from towerrec.train import train  # here, so that reading results back does not load Lightning

    t0 = time.perf_counter()
    git, command = git_state(), _command()
    ks = sorted(int(k) for k in cfg.ks)
    if not cfg.experiments or not cfg.seeds:
        raise ValueError("experiments and seeds must each name at least one entry")
    if cfg.k not in ks:
        raise ValueError(f"k={cfg.k} must be one of ks={ks}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Compose every run first: a typo or a mix of data sets fails now, not after an hour of training.
    runs = compose_runs(cfg, out, ks)
    hashes = {name: config_hash(run_cfg.data) for name, _, run_cfg in runs}
    if len(set(hashes.values())) > 1:
        raise ValueError(f"the experiments must share one data config, got config hashes {hashes}")
    first = runs[0][2]
    timings: dict[str, float] = {}

    t = time.perf_counter()
    ensure_prepared(first.data, workers=first.workers)
    manifest = read_manifest(first.data.processed_dir)
    timings["prepare"] = time.perf_counter() - t

    baselines: dict[str, Slices] = {}
    if cfg.baselines:
        t = time.perf_counter()
        baselines = run_baselines(cfg, first, out / "baselines", ks)
        timings["baselines"] = time.perf_counter() - t

    trained: dict[str, list[dict]] = {}
    for i, (name, seed, run_cfg) in enumerate(runs):
        log.info("training %s, seed %d (run %d of %d)", name, seed, i + 1, len(runs))
        t = time.perf_counter()
        metrics = train(run_cfg)
        seconds = time.perf_counter() - t
        if metrics["data"]["config_hash"] != manifest["config_hash"]:
            raise RuntimeError(
                f"{name} seed {seed} trained on other data than the table's: {metrics['data']}"
            )
        run = {
            "seed": seed,
            "dir": str(Path(run_cfg.paths.output_dir).relative_to(out)),
            "seconds": round(seconds, 1),
            "val": metrics["val"],
            "test": metrics["test"],
        }
        trained.setdefault(name, []).append(run)
        if i == 0 and time.perf_counter() - t0 + seconds * (len(runs) - 1) > 60 * cfg.budget_minutes:
            log.warning(
                "at %.0f s per run, %d runs exceed the %d min budget: shorten the schedule (train_overrides) "
                "or set run_max_time",
                seconds,
                len(runs),
                cfg.budget_minutes,
            )
        gc.collect()  # one model at a time in memory
    timings["training"] = sum(r["seconds"] for rs in trained.values() for r in rs)

    models: dict[str, dict] = {}
    for name, rs in trained.items():
        mean, std = mean_std([r.pop("test") for r in rs])
        frames = [out / r["dir"] / "test_per_user.parquet" for r in rs]
        interval = pooled_intervals([pd.read_parquet(f) for f in frames], ks) if all(f.is_file() for f in frames) else {}
        overrides = run_overrides(name, cfg.variants)
        seeds = [r["seed"] for r in rs]
        models[name] = {
            "kind": "trained",
            "overrides": overrides,
            "seeds": seeds,
            "metrics": mean,
            "std": std,
            "interval": interval,
            "runs": rs,
        }
    for name, slices in baselines.items():
        models.setdefault(name, {"kind": "baseline", "metrics": slices, "interval": interval_pairs(slices)})

    wall = time.perf_counter() - t0
    if wall > 60 * cfg.budget_minutes:
        log.warning("the reproduction took %s, over the %d min budget", _duration(wall), cfg.budget_minutes)
    header = {
        "data": data_fingerprint(manifest),
        "git": git,
        "wall_seconds": round(wall, 1),
        "budget_minutes": cfg.budget_minutes,
        "timings_seconds": {key: round(value, 1) for key, value in timings.items()},
        "split": {"name": "test", **manifest["split"]},
        "seeds": [int(s) for s in cfg.seeds],
        "k": cfg.k,
        "ks": ks,
        "experiments": {name: m["overrides"] for name, m in models.items() if m["kind"] == "trained"},
        "train_overrides": list(cfg.train_overrides),
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    result = _json_safe({"header": header, "models": models})
    (out / "reproduce.json").write_text(json.dumps(result, indent=2))
    text = f"{format_header(header)}\n\n{format_reproduce_table(models, list(cfg.slices), cfg.k)}\n"
    (out / "reproduce.md").write_text(text)
    print(f"\n{text}\nwritten: {out / 'reproduce.md'}, {out / 'reproduce.json'}")
    return result


# ----------------------------------------------------------------------------- reading results back
def results_file(path: str | Path) -> Path:
    """The results file at ``path``: a ``reproduce.json`` or ``metrics.json``, a folder holding one, or a
    folder of run folders (``outputs/reproduce``), whose newest holding one is taken."""
    path = Path(path)
    if path.is_file():
        return path
    for name in ("reproduce.json", "metrics.json"):
        if (path / name).is_file():
            return path / name
    found = [p for name in ("reproduce.json", "metrics.json") for p in path.glob(f"*/{name}")]
    if not found:
        raise FileNotFoundError(f"{path}: no reproduce.json or metrics.json here or in its subfolders")
    return max(found, key=lambda p: p.stat().st_mtime)


def load_results(path: str | Path) -> pd.DataFrame:
    """Every model's metrics from a towerrec-reproduce, towerrec-eval or towerrec-train output, as a long table.

    Args:
        path: a results file or folder, as :func:`results_file` accepts.

    Returns:
        Columns ``model``, ``kind`` (trained | baseline), ``slice``, ``users``, ``metric`` (recall, ndcg,
        mrr, hit, coverage, ...), ``k``, ``value`` and ``std`` (NaN for a single run).
    """
    data = json.loads(results_file(path).read_text())
    if "header" in data:  # towerrec-reproduce
        models = {n: (m["kind"], m["metrics"], m.get("std", {})) for n, m in data["models"].items()}
    elif "test" in data:  # towerrec-train
        models = {"two_tower": ("trained", data["test"], {})}
    else:  # towerrec-eval: several scorers, or one at the top level
        scorers = data["models"] if "models" in data else {data["model"]: data}
        models = {
            n: (
                "trained" if n == "two_tower" else "baseline",
                {s: v for s, v in r.items() if isinstance(v, dict) and s != "data"},
                {},
            )
            for n, r in scorers.items()
        }
    rows = []
    for name, (kind, slices, stds) in models.items():
        for sl, values in slices.items():
            for key, value in values.items():
                if "@" not in key:
                    continue
                metric, k = key.split("@")
                std = stds.get(sl, {}).get(key)
                rows.append(
                    {
                        "model": name,
                        "kind": kind,
                        "slice": sl,
                        "users": values.get("users"),
                        "metric": metric,
                        "k": int(k),
                        "value": math.nan if value is None else value,
                        "std": math.nan if std is None else std,
                    }
                )
    return pd.DataFrame(rows)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="reproduce")
def _main(cfg: DictConfig) -> None:
    reproduce(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
