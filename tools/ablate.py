"""The paper's GRPO ablations as one command, on the CPU demo's pipeline:

    python tools/ablate.py [--seeds 3] [--arms all|name,...] [--out ablation_output] [--quick]
                           [--families F ...] [--reuse] [--resume]

Per seed, the demo's data, tokenizer, preprocessing and cold-start SFT run once (``examples/demo``); every
arm then runs GRPO from that same SFT checkpoint with the same data, iterations and sampling budget,
changing one config switch against the baseline (curriculum order, EDNM lambda 2, Eq. 6 dynamic weights,
Eq. 7 cosine KL, no repetition penalty). Each arm is scored by its held-out curve's last point (greedy,
the demo's held-out split, every arm's reward scored with the baseline's reward switches). ``--resume``
keeps an earlier run's results in ``<out>/results.json`` and runs only the missing ones. Writes
``<out>/ablations.md`` (mean +- 95% interval over seeds of held-out accuracy and reward per task and of
the repetition rate, and each arm's difference to the baseline with its paired interval) and
``<out>/ablations.png`` (per-seed accuracy and the paired differences).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# arm -> overrides of the demo's GRPO config (section -> {key: value}); "baseline" is the paper's recipe
ARMS: dict[str, dict] = {
    "baseline": {},
    "shuffled": {"data": {"order": "shuffle"}},
    "ednm_lambda1": {"grpo": {"ednm_lambda": 1.0}},
    "ednm_lambda5": {"grpo": {"ednm_lambda": 5.0}},
    "binary_numeric": {"grpo": {"numeric_reward": "binary"}},
    "static_weights": {"grpo": {"advantage_weighting": "static"}},
    "constant_kl": {"grpo": {"kl_schedule": "constant"}},  # beta: the baseline cosine's mean (arm_config)
    "repetition_penalty": {"grpo": {"repetition_penalty": True}},
}


def _demo():
    spec = importlib.util.spec_from_file_location("m2mega_demo", ROOT / "examples/demo/run_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _reward_switches(grpo: dict) -> dict:
    """The values in a ``grpo`` config section of the reward switches some arm changes (defaults filled)."""
    from m2mega.train.config import REWARD_SWITCHES, GRPOConfig

    keys = sorted({k for kv in ARMS.values() for k in kv.get("grpo", {}) if k in REWARD_SWITCHES})
    return {k: grpo.get(k, getattr(GRPOConfig, k)) for k in keys}


def arm_config(base: dict, arm: str, out: Path) -> dict:
    """The baseline GRPO config with ``arm``'s overrides and its own checkpoint / TensorBoard dirs, its
    held-out points scored with the baseline's reward (``grpo.eval_reward``) so the arms' rewards compare."""
    cfg = copy.deepcopy(base)
    for section, kv in ARMS[arm].items():
        cfg.setdefault(section, {}).update(kv)
    g = cfg["grpo"]
    g["eval_reward"] = _reward_switches(base.get("grpo", {}))
    if arm == "constant_kl":  # the same KL budget as Eq. 7's cosine, spent evenly
        g["beta"] = (g["beta_max"] + g["beta_min"]) / 2
    # only the curve's end point is scored: evaluate at the start and the end, greedily
    g["eval_interval"] = cfg["schedule"]["train_iters"]
    g["eval_samples"] = 0
    cfg["checkpoint"] = {**cfg["checkpoint"], "save_dir": str(out / f"ckpt_{arm}"), "save_at_end": False}
    cfg["logging"] = {**cfg["logging"], "tensorboard_dir": str(out / f"tb/{arm}")}
    return cfg


def summarize(results: dict[str, list[dict]]) -> tuple[str, list[str]]:
    """Markdown table: per arm, mean +- 95% interval over seeds of held-out accuracy / reward per task and
    the repetition rate; then each arm minus the baseline (paired by seed) with a within-noise verdict."""
    from m2mega.rl.tables import mean_ci

    arms = list(results)
    tasks = sorted({t for rs in results.values() for r in rs for t in r if t != "all" and not t.startswith("_")})
    tasks.append("all")
    head = ["arm", "seeds"] + [f"{t} acc" for t in tasks] + [f"{t} reward" for t in tasks] + ["repetition"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]

    def cell(vals: list[float]) -> str:
        m, h = mean_ci(vals)
        return f"{m:.3f}" + (f" +- {h:.3f}" if h == h else "")

    for arm in arms:
        rs = results[arm]
        row = [arm, str(len(rs))]
        row += [cell([r.get(t, {}).get("correct", float("nan")) for r in rs]) for t in tasks]
        row += [cell([r.get(t, {}).get("reward", float("nan")) for r in rs]) for t in tasks]
        row.append(cell([r["all"]["repetition"] for r in rs]))
        lines.append("| " + " | ".join(row) + " |")
    verdicts = []
    if "baseline" in results:
        lines += ["", "Difference to the baseline (same seed, same SFT model), all tasks, mean +- 95% interval:", "",
                  "| arm | d acc | d reward | within noise? |", "| --- | ---: | ---: | --- |"]
        base = {r["_seed"]: r for r in results["baseline"]}
        for arm in arms:
            if arm == "baseline":
                continue
            pairs = [(r, base[r["_seed"]]) for r in results[arm] if r["_seed"] in base]
            da = mean_ci([r["all"]["correct"] - b["all"]["correct"] for r, b in pairs])
            dr = mean_ci([r["all"]["reward"] - b["all"]["reward"] for r, b in pairs])
            noise = all(h != h or abs(m) <= h for m, h in (da, dr))
            verdicts.append(f"{arm}: {'within noise' if noise else 'outside the 95% interval'}")
            fmt = lambda mh: f"{mh[0]:+.3f}" + (f" +- {mh[1]:.3f}" if mh[1] == mh[1] else "")  # noqa: E731
            lines.append(f"| {arm} | {fmt(da)} | {fmt(dr)} | {'yes' if noise else 'no'} |")
    return "\n".join(lines), verdicts


def plot(results: dict[str, list[dict]], path: Path) -> None:
    """Left: held-out accuracy per arm, one line per seed (seeds differ far more than arms do at small
    sizes, so the seed lines show what the bars' intervals hide). Right: each arm minus the baseline,
    paired by seed: the mean with its 95% interval and the seeds' own differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from m2mega.rl.tables import mean_ci

    arms = list(results)
    seeds = sorted({r["_seed"] for rs in results.values() for r in rs})
    acc = {a: {r["_seed"]: r["all"]["correct"] for r in results[a]} for a in arms}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = range(len(arms))
    for s in seeds:
        ax.plot(x, [acc[a].get(s, float("nan")) for a in arms], "o-", alpha=0.7, label=f"seed {s}")
    ax.plot(x, [mean_ci(list(acc[a].values()))[0] for a in arms], "k_", markersize=18, mew=2, label="mean")
    ax.set_xticks(x, arms, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("held-out accuracy (all tasks, greedy)")
    ax.legend(fontsize=7)
    others = [a for a in arms if a != "baseline"] if "baseline" in arms else []
    base = {r["_seed"]: r["all"] for r in results.get("baseline", [])}
    for i, a in enumerate(others):
        for key, off, color in (("correct", -0.15, "C0"), ("reward", 0.15, "C1")):
            d = [r["all"][key] - base[r["_seed"]][key] for r in results[a] if r["_seed"] in base]
            m, h = mean_ci(d)
            bx.errorbar(i + off, m, yerr=0 if h != h else h, fmt="o", color=color, capsize=4,
                        label=("d accuracy" if key == "correct" else "d reward") if i == 0 else None)
            bx.plot([i + off] * len(d), d, ".", color=color, alpha=0.4)
    bx.axhline(0, color="k", lw=0.8)
    bx.set_xticks(range(len(others)), others, rotation=35, ha="right", fontsize=8)
    bx.set_ylabel("arm - baseline, same seed (all tasks)")
    if others:
        bx.legend(fontsize=7)
    fig.suptitle(f"GRPO ablations over {len(seeds)} seed(s): per seed, and paired differences "
                 f"(mean, 95% interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _prepared(sdir: Path, seed: int) -> dict | None:
    """The baseline GRPO config of a seed directory the demo (or an earlier run) already prepared: its
    ``grpo.yaml`` with an SFT checkpoint beside it; None if either is missing."""
    import yaml

    cfg_path = sdir / "grpo.yaml"
    if not (cfg_path.exists() and (sdir / "ckpt_sft" / "latest").exists()):
        return None
    cfg = yaml.safe_load(cfg_path.read_text())
    if cfg.get("seed") != seed:
        raise SystemExit(f"error: --reuse: {cfg_path} is for seed {cfg.get('seed')}, not {seed}")
    return cfg


def _kept(saved: list[dict], seed: int, base: dict, arm: str) -> dict | None:
    """--resume: ``seed``'s saved result of ``arm`` if it was scored with the reward this run scores with
    (the baseline's). Results of runs before ``grpo.eval_reward`` carry no ``_scored_with``: they were scored
    with the arm's own training reward, which equals the baseline's only for arms that leave it alone."""
    want = _reward_switches(base.get("grpo", {}))
    for r in saved:
        if r.get("_seed") == seed:
            own = {**base.get("grpo", {}), **ARMS[arm].get("grpo", {})}  # the arm's training reward
            scored = r.get("_scored_with", _reward_switches(own))
            return r if scored == want else None
    return None


def _noop_notes(eval_jsonl: Path, arms: list[str]) -> list[str]:
    """Arms that cannot differ from the baseline on this data: EDNM is the reward of spatial number
    answers only (``GRPOConfig.reward_config_dict``), so without such rows its arms equal the baseline."""
    same = [x for x in arms if {"ednm_lambda", "numeric_reward"} & set(ARMS[x].get("grpo", {}))]
    if not same:
        return []
    rows = [json.loads(line) for line in open(eval_jsonl, encoding="utf-8")]
    if any(r["task"] == "spatial" and r["answer_type"] == "number" for r in rows):
        return []
    return [f"note: the held-out data has no spatial number answers, so {', '.join(same)} equal(s) the baseline "
            f"by construction (pass --families with a spatial number family, e.g. length)"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "ablation_output"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1234, help="first seed (then seed+1, ...)")
    ap.add_argument("--arms", default="all", help=f"comma-separated subset of {', '.join(ARMS)}")
    ap.add_argument("--quick", action="store_true", help="the demo's --quick sizes (a smoke test, not a result)")
    ap.add_argument("--families", nargs="+", default=None,
                    help="synthetic task families (default: the demo's own); the EDNM arms need a spatial "
                         "family with number answers, e.g. --families hue length")
    ap.add_argument("--reuse", action="store_true",
                    help="skip data + SFT for a seed whose directory already holds them (e.g. --out demo_output "
                         "after `make demo SEEDS=3`): that directory's grpo.yaml is the baseline")
    ap.add_argument("--resume", action="store_true",
                    help="keep the (arm, seed) results already in <out>/results.json that were scored with this "
                         "run's held-out reward and run only the others (implies --reuse)")
    a = ap.parse_args(argv)
    a.reuse = a.reuse or a.resume
    arms = list(ARMS) if a.arms == "all" else [x.strip() for x in a.arms.split(",") if x.strip()]
    bad = [x for x in arms if x not in ARMS]
    if bad:
        ap.error(f"--arms: unknown arm(s) {bad}; known: {', '.join(ARMS)}")
    if a.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {a.seeds}")
    demo = _demo()
    S = demo.QUICK if a.quick else demo.FULL
    if a.families:
        from m2mega.data.synthetic import ALL_FAMILIES

        unknown = [f for f in a.families if f not in ALL_FAMILIES]
        if unknown:
            ap.error(f"--families: unknown {unknown}; known: {', '.join(ALL_FAMILIES)}")
        S = {**S, "families": tuple(a.families)}
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seeds = [a.seed + i for i in range(a.seeds)]
    saved = json.loads((out / "results.json").read_text()) if a.resume and (out / "results.json").exists() else {}
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    kept = 0
    for seed in seeds:
        sdir = out / f"seed_{seed}"
        base = _prepared(sdir, seed) if a.reuse else None
        todo = []
        for arm in arms:
            old = _kept(saved.get(arm, []), seed, base, arm) if base is not None else None
            if old is None:
                todo.append(arm)
            else:
                results[arm].append(old)
                kept += 1
        if todo and base is None:
            _, _, base = demo.prepare(sdir, seed, S, evaluate_init=False)
        elif todo:
            demo._say(f"seed {seed}: reusing the data and SFT checkpoint in {sdir}")
        for arm in todo:
            demo._say(f"seed {seed}: arm {arm}")
            cfg = arm_config(base, arm, sdir)
            _, curve = demo.grpo_stage(sdir, S, cfg, tag=f"grpo_{arm}")
            results[arm].append({**curve[-1]["table"], "_seed": seed, "_scored_with": cfg["grpo"]["eval_reward"]})
        for arm in arms:
            results[arm].sort(key=lambda r: r["_seed"])
        (out / "results.json").write_text(json.dumps({**saved, **results}, indent=1))
    wall = time.perf_counter() - t0
    table, verdicts = summarize(results)
    notes = _noop_notes(out / f"seed_{a.seed}/data/eval.jsonl", arms)
    cmd = "python tools/ablate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    runs = f"wall time {wall:.0f}s" + (f" (for the runs made now; {kept} (arm, seed) result(s) kept from an earlier "
                                       f"run's results.json)" if kept else "")
    text = (f"command: `{cmd}`; {a.seeds} seed(s), {runs}\n\n"
            f"held-out (greedy, last point of each arm's curve), mean +- 95% interval over seeds:\n\n{table}\n"
            + "".join(f"\n{n}\n" for n in notes))
    (out / "ablations.md").write_text(text)
    plot(results, out / "ablations.png")
    print(text + "\n" + "\n".join(verdicts), flush=True)  # the notes are in the text
    return 0


if __name__ == "__main__":
    sys.exit(main())
