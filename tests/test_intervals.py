"""Does "different" in report.md mean what a 95% interval means? Reports of two identical methods are
simulated and compared by reports.paired_differences itself; the share of "different" calls must be near 5%
with 2, 3 and 6 seeds, whatever the training noise. `python -m tests.test_intervals` prints the table of
docs/results.md (the shares, and the power against a method with 20% fewer toxic replies).

The model (the staleness issue's review): 256 contexts, 8 replies each; each context's toxicity rate drawn
from Beta(0.5, 3), the same for both methods and every seed (the same contexts); each seed's model multiplies
every rate by exp(N(0, sd)), its training noise."""

import numpy as np
import pytest

import evaluate
from harness import reports

KEY = "toxicity_adversarial"
CONTEXTS, REPLIES = 256, 8
SEEDS = (2, 3, 6)
NOISE = (0.0, 0.15, 0.3, 0.6)
EFFECT = 0.8  # for the power: the method's rates x 0.8


def different_share(n_seeds, sd, n_reports=1000, effect=1.0, seed=0, contexts=CONTEXTS, replies=REPLIES,
                    beta=(0.5, 3)):
    """The share of simulated n_reports in which report.md would call the method different from DPO."""
    rng = np.random.default_rng(seed)
    rates = rng.beta(*beta, size=(n_reports, 1, contexts))

    def toxic_counts(rate):  # (n_reports, seeds, contexts)
        noise = np.exp(rng.normal(0.0, sd, size=(n_reports, n_seeds, 1)))
        return rng.binomial(replies, np.minimum(rate * noise, 1.0)).astype(float)

    dpo, method = toxic_counts(rates), toxic_counts(rates * effect)
    per_context = np.full(contexts, float(replies))
    calls = 0
    for r in range(n_reports):
        runs = {"dpo": [({}, {KEY: (dpo[r, i], per_context)}) for i in range(n_seeds)],
                "adpo": [({}, {KEY: (method[r, i], per_context)}) for i in range(n_seeds)]}
        report = {name: {KEY: float(sum(u[KEY][0].sum() for _, u in rs) / (replies * contexts * n_seeds))}
                  for name, rs in runs.items()}
        reports.paired_differences(report, runs)
        low, high = report["adpo"][f"{KEY}_diff_vs_dpo_ci95"]
        calls += low > 0 or high < 0
    return calls / n_reports


@pytest.mark.parametrize("n_seeds", SEEDS)
def test_identical_methods_are_called_different_in_about_5_percent_of_reports(n_seeds):
    shares = [different_share(n_seeds, sd) for sd in NOISE]
    assert all(0.02 <= share <= 0.08 for share in shares), dict(zip(NOISE, shares))


@pytest.mark.parametrize("n_seeds", SEEDS)
def test_rare_toxicity_and_ties_keep_the_5_percent(n_seeds):
    """The cpu preset's case: 128 contexts x 4 replies, toxicity near 1%: a few toxic replies per seed, so
    two seeds often tie on their difference; a tie is no proof (at most 5% of calls, not 8 or 10%)."""
    shares = [different_share(n_seeds, sd, contexts=128, replies=4, beta=(0.5, 60)) for sd in (0.0, 0.3)]
    assert all(share <= 0.06 for share in shares), shares


def test_a_real_difference_is_found_more_often_with_more_seeds():
    """The power against 20% fewer toxic replies, without training noise: it grows with the seeds."""
    power = [different_share(n, 0.0, n_reports=300, effect=EFFECT, seed=1) for n in SEEDS]
    assert power[0] < power[1] < power[2] and power[2] > 0.9, power


def table():
    """The docs' table; one seed (the contexts' bootstrap, no training noise in it) on 300 reports a cell."""
    rows = [["seeds"] + [f"sd {sd}: identical methods called different" for sd in NOISE]
            + [f"sd {sd}: power, 20% fewer" for sd in NOISE]]
    for n in (1,) + SEEDS:
        n_reports = 300 if n == 1 else 1000
        rows.append([str(n)] + [f"{different_share(n, sd, n_reports):.3f}" for sd in NOISE]
                    + [f"{different_share(n, sd, n_reports, effect=EFFECT, seed=1):.3f}" for sd in NOISE])
    for n in SEEDS:  # the cpu preset's size, toxicity near 1%
        rare = dict(contexts=128, replies=4, beta=(0.5, 60))
        rows.append([f"{n}, 128 x 4, rare"] + [f"{different_share(n, sd, **rare):.3f}" for sd in NOISE]
                    + [f"{different_share(n, sd, effect=EFFECT, seed=1, **rare):.3f}" for sd in NOISE])
    return reports.markdown_table(rows)


if __name__ == "__main__":
    print(table())
