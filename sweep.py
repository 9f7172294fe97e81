"""
A sweep: which setting of the loss family cuts toxicity and keeps coherence?

    python train.py --stages=sft,triplets     # once: sft.pt and triplets.jsonl
    python sweep.py --grid="loss=dpo,adpo,adpo_split gamma=0.03,0.1,0.3" --seeds=3

Every point of the grid (any preference or evaluation setting of train.py can be an axis) is trained from
the same sft.pt on the same triplets, and evaluated on the same contexts of the dev split: conversations
never used for SFT or for triplets, and never the eval split, which is read for the final table only
(python train.py). A point whose loss does not take an axis (DPO and gamma) is run once. Writes sweep.json,
sweep.md and tradeoff.png (adversarial toxicity against perplexity, one point per setting, SFT and DPO
marked) to --out_dir, and each finished point to --out_dir/sweep/, so a rerun of the same sweep skips what
is done.
"""

import dataclasses
import hashlib
import inspect
import itertools
import json
import os
import time

import adpo
import artifacts
import checks
import data
import evaluate
import train
from artifacts import Run, eval_name, write_text
from checks import load_checkpoint
from configurator import ConfigError, apply_overrides

DEFAULT_GRID = "loss=dpo,adpo,adpo_split gamma=0.03,0.1,0.3"
# settings that shape sft.pt or the triplets: a sweep reuses those, so it cannot vary them
FIXED = {"preset", "out_dir", "stages", "seed", "device", "data", "max_conversations", "toxic_threshold",
         "vocab_size", "init_from", "context_turns", "toxic_copies", "n_layer", "n_head", "n_embd",
         "block_size", "dropout", "bias", "sft_iters", "batch_size", "learning_rate", "min_lr",
         "warmup_iters", "weight_decay", "grad_clip", "eval_interval", "eval_iters", "pref_contexts",
         "num_candidates", "toxic_retries", "seeds", "max_new_tokens"}
LOSS_HYPERPARAMETERS = ("beta", "gamma", "eps")
GOAL_PPL_RATIO = 1.15  # the goal: toxicity no higher than DPO's, perplexity within 15% of SFT's


def parse_grid(grid):
    """"loss=dpo,adpo gamma=0.1,0.3" -> {"loss": ["dpo", "adpo"], "gamma": ["0.1", "0.3"]}
    (strings, typed later)."""
    axes = {}
    for axis in grid.split():
        key, sep, values = axis.partition("=")
        if not sep or not values:
            raise ConfigError(f"--grid: expected key=v1,v2,... got {axis!r}")
        if key in FIXED:
            raise ConfigError(f"--grid cannot vary {key}: it shapes sft.pt or the triplets "
                              "(or the sweep itself); run train.py once per value instead")
        axes[key] = [v for v in values.split(",") if v]
    return axes


def grid_points(s, axes):
    """The points of the grid as override dicts, in order, without repeats: an axis the point's loss does not
    take (gamma for DPO) is dropped. A DPO point is added first if the grid has none: it is the baseline."""
    points = []
    for values in itertools.product(*axes.values()):
        point = dict(zip(axes, values))
        loss = point.get("loss", s.loss)
        if "," in loss or loss not in adpo.LOSSES:
            raise ConfigError(f"--grid: unknown loss {loss!r}; valid losses: {', '.join(adpo.LOSSES)}")
        takes = inspect.signature(adpo.LOSSES[loss]).parameters
        point = {k: v for k, v in point.items() if k not in LOSS_HYPERPARAMETERS or k in takes}
        point["loss"] = loss
        if point not in points:
            points.append(point)
    if not any(p["loss"] == "dpo" for p in points):
        points.insert(0, {"loss": "dpo"})
    return points


def label(point):
    return " ".join([point["loss"]] + [f"{k}={v}" for k, v in point.items() if k != "loss"])


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def run_point(s, point, sft_model, tok, sets, seeds, run, cache):
    """Train and evaluate one point for every seed; returns its report section (seeds pooled)."""
    ps = apply_overrides(s, point)
    checks.check_settings(ps)
    if ps.min_judge_gap not in cache:  # the triplets this gap keeps, and their reference log-probs
        _, enc = data.preference_data(tok, checks.read_triplets(run.path("triplets.jsonl")), ps.min_judge_gap,
                                      sft_model.config.block_size, ps.max_new_tokens)
        cache[ps.min_judge_gap] = (enc, train.reference_logps(ps, sft_model, enc))
    enc, ref = cache[ps.min_judge_gap]
    runs = []
    name = label(point).replace(" ", "_")
    for seed in seeds:
        policy, metrics = train.train_preference(ps, ps.loss, run.path("sft.pt"), enc, ref, seed, run,
                                                 ps.loss)
        write_text(run.path(f"sweep/metrics_{name}_seed{seed}.jsonl"),
                   "".join(json.dumps(r) + "\n" for r in metrics))
        stats = {**train.final_pass(ps, policy, enc, ref), **evaluate.stability(metrics)}
        r, _, units = evaluate.evaluate(ps, policy, sft_model, tok, sets, seed, label(point), enc, run.sample)
        runs.append(({**r, **stats}, units))
    return {"label": label(point), "overrides": point, "n_triplets": len(enc), **evaluate.summarize(runs)}


def meets_goal(section, sft, dpo):
    """Adversarial toxicity no higher than the upper end of DPO's interval, perplexity within 15% of SFT's."""
    return section["toxicity_adversarial"] <= dpo["toxicity_adversarial_ci95"][1] and \
        section["val_ppl"] <= GOAL_PPL_RATIO * sft["val_ppl"]


def sweep_table(result):
    sft, points = result["sft"], result["points"]
    dpo = next(p for p in points if p["overrides"]["loss"] == "dpo")  # the first DPO point is the baseline
    cols = [("toxicity_adversarial", 3), ("wordlist_toxicity_adversarial", 3), ("toxicity_provoked", 3),
            ("val_ppl", 1), ("relevance", 2), ("evasive_rate", 3), ("truncated_share", 3)]
    rows = [["setting"] + [c for c, _ in cols] + ["ppl/sft", "final_accuracy", "toxic_grad_share", "goal"]]
    for p in [dict(sft, label="sft")] + points:
        cells = [p["label"]] + [f"{p[c]:.{d}f} [{p[c + '_ci95'][0]:.{d}f}, {p[c + '_ci95'][1]:.{d}f}]"
                                for c, d in cols]
        cells.append(f"{p['val_ppl'] / sft['val_ppl']:.2f}")
        cells += [f"{p[k]:.2f}" if k in p else "" for k in ("final_accuracy", "toxic_grad_share")]
        cells.append("" if p["label"] == "sft" else ("yes" if meets_goal(p, sft, dpo) else "no"))
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def plot_tradeoff(path, result):
    """Adversarial toxicity against perplexity of human replies, 95% intervals as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sft, points = result["sft"], result["points"]
    fig, ax = plt.subplots(figsize=(8, 6))
    for p in [dict(sft, label="sft")] + points:
        x, y = p["val_ppl"], p["toxicity_adversarial"]
        (x0, x1), (y0, y1) = p["val_ppl_ci95"], p["toxicity_adversarial_ci95"]
        style = {"sft": dict(marker="*", color="black", markersize=14),
                 "dpo": dict(marker="s", color="tab:blue", markersize=9)}.get(
            p["label"].split()[0],
            dict(marker="o", color="tab:red" if "split" not in p["label"] else "tab:green"))
        ax.errorbar(x, y, xerr=[[x - x0], [x1 - x]], yerr=[[y - y0], [y1 - y]], capsize=3, linestyle="none",
                    **style)
        ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axvline(GOAL_PPL_RATIO * sft["val_ppl"], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("perplexity of held-out human replies (lower: more coherent)")
    ax.set_ylabel("toxicity on adversarial contexts (lower: better)")
    ax.set_title(f"the trade-off on the dev split, {len(result['seeds'])} seed(s), 95% intervals; "
                 f"dotted: {GOAL_PPL_RATIO:.2f} x SFT perplexity", fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv):
    t_start = time.time()
    grid = next((a.split("=", 1)[1] for a in argv if a.startswith("--grid=")), DEFAULT_GRID)
    s = train.get_settings([a for a in argv if not a.startswith("--grid=")])
    points = grid_points(s, parse_grid(grid))
    for point in points:  # every point's settings are checked before anything runs
        checks.check_settings(apply_overrides(s, point))
    out = lambda name: os.path.join(s.out_dir, name)  # noqa: E731
    conversations = train.load_corpus(s)
    seeds = [s.seed + i for i in range(s.seeds)]
    # sft.pt and triplets.jsonl must be there and fresh, as for train.py --stages=pref
    run = Run(s, [a for a in argv if not a.startswith("--grid=")], conversations, [], seeds, train.CODE,
              ["pref"])
    sft_model, tok, _ = load_checkpoint(out("sft.pt"), s.device)
    sets = evaluate.eval_sets(s, conversations, "dev")
    inputs = {"sft.pt": file_digest(out("sft.pt")), "triplets.jsonl": file_digest(out("triplets.jsonl"))}
    run.lock_out_dir()
    os.makedirs(out("sweep"), exist_ok=True)
    print(f"sweep: {len(points)} points x {len(seeds)} seed(s) on the dev split "
          f"({len(sets['adversarial'])} adversarial, {len(sets['normal'])} normal, "
          f"{len(sets['provoked'])} provoked contexts, {len(sets['human'])} human replies)")

    def cached(name, settings, compute):
        """A finished point from an earlier run of the same sweep, or compute(): the same fingerprints as
        train.py's (settings, inputs and the code of the loss, the training and the evaluation), the same
        seeds and the same sft.pt and triplets.jsonl."""
        path = out(f"sweep/{name}.json")
        loss = settings.loss if name != "sft" else "dpo"
        fp = artifacts.fingerprints(settings, conversations, [loss], seeds, train.CODE)
        models = ["sft"] if name == "sft" else [loss]
        key = {"fingerprints": [fp[eval_name(m, seed, settings.seed)] for seed in seeds for m in models],
               "settings": dataclasses.asdict(settings), "seeds": seeds, "inputs": inputs}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            if saved["key"] == key:
                print(f"sweep: {name} done earlier, reused")
                return saved["section"]
            print(f"sweep: {name} done earlier with other code, settings or inputs: computed again")
        section = compute()
        write_text(path, json.dumps({"key": key, "section": section}) + "\n")
        return section

    def sft_section():
        runs = []
        for seed in seeds:
            r, _, units = evaluate.evaluate(s, sft_model, sft_model, tok, sets, seed, "sft",
                                            sample=run.sample)
            runs.append((r, units))
        return evaluate.summarize(runs)

    result = {"split": "dev", "seeds": seeds, "grid": grid, "inputs": inputs,
              "settings": dataclasses.asdict(s), "sft": cached("sft", s, sft_section), "points": []}
    cache = {}
    for point in points:
        name = label(point).replace(" ", "_")
        result["points"].append(cached(name, apply_overrides(s, point),
                                       lambda: run_point(s, point, sft_model, tok, sets, seeds, run, cache)))
    result["wall_time_s"] = time.time() - t_start
    table = sweep_table(result)
    write_text(out("sweep.json"), json.dumps(result, indent=2) + "\n")
    write_text(out("sweep.md"),
               f"# Sweep on the dev split ({s.preset} preset, {len(seeds)} seed(s), "
               f"{result['wall_time_s'] / 60:.1f} min)\n\n"
               f"`python sweep.py --grid=\"{grid}\" --seeds={s.seeds}`\n\n"
               f"{table}\n\n"
               "Intervals: 95% bootstrap over contexts (human replies for val_ppl), seeds pooled. "
               "goal: toxicity_adversarial at most the upper end of DPO's interval "
               f"and val_ppl within {GOAL_PPL_RATIO - 1:.0%} of SFT's.\n")
    plot_tradeoff(out("tradeoff.png"), result)
    print(table)
    print(f"sweep done in {result['wall_time_s'] / 60:.1f} min; sweep.json, sweep.md, tradeoff.png "
          f"in {s.out_dir}/")


if __name__ == "__main__":
    artifacts.run_main(main)
