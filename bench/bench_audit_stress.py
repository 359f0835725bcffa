"""The audit under settings the matrix holds fixed: the same per-cell targets, one knob turned at a time.

`bench.bench_audit_matrix` varies the click model, the ranker and exploration; everything else is its defaults
(products of one grade spread in appeal by `pair_noise` 0.5, the simulator's attractiveness range and position
decay, 10% planted errors, 70% of them to an adjacent grade). The figures will also be checked on click logs made
by models and parameters not in this repository, so this bench turns each of those knobs on the issue's hardest
setting (a DBN shopper, a fixed production ranker, no exploration), CrowdFlower by default:

- ``appeal_spread_1.0`` / ``_1.5`` / ``_0``: products of one grade two or three times as varied in appeal, or not at all;
- ``grades_close``: the grades' click attractiveness 0.15-0.35 instead of 0.03-0.6 (engagement tells grades apart less);
- ``impatient``: shoppers who go on after a click only 60% of the time (DBN ``continue_prob`` 0.6, not 0.9);
- ``errors_20pct``: 20% planted errors; ``errors_5pct``: 5%;
- ``errors_uniform``: errors to any other grade, none preferring a neighbour;
- ``light_traffic``: a third of the sessions;
- ``pbm_steep_position_decay``, ``pbm_appeal_spread_1.0``: a position-based shopper (fixed ranker, no exploration)
  whose examination falls off twice as fast with the rank, or with twice the appeal spread;
- ``ranker_sharp``: a production ranker that knows the grades better (rank noise 0.3 instead of 1), so position
  and grade go together and the log has less to tell them apart with;
- ``zipf_steep``: query popularity exponent 1.5 instead of 1 (a few head queries take most sessions);
- ``trust_bias`` / ``trust_bias_strong``: a click model the audit has no term for, position-based examination
  with trust bias (`auditor.simulate`, click model ``trust``): an examined product that does not appeal is
  still clicked with probability 0.15 (0.3) times its examination, so a click at the top says less.
  The oracle there is Bayes' rule with the examination alone, as elsewhere: it does not know the trust
  term either, so it is a reference, not a bound.

Each row: the audit's precision, recall and F1 against the oracle's (Bayes' rule with the simulator's truth), the
flagged share against the true error share, and the flag score's calibration error. Every figure is SIMULATED.
Writes bench/results/audit_stress.json.

    python -m bench.bench_audit_stress [--dataset crowdflower|homedepot] [--variants a,b]
"""
from __future__ import annotations

import argparse
import json
import sys

from app.retriever_cosine import zero_shot_cosine
from auditor.settings import AuditSettings
from bench.bench_audit_matrix import LABELER, RESULTS, SESSIONS, Corruption, cell_figure, earlier_cells, run_dataset
from bench.common import device
from labelstore.paths import shared_data_dir

RESULTS_NAME = "audit_stress"
RANKER, EXPLORE = "fixed", 0.0
# variant -> (click model, SimulationParams overrides, planted errors, share of the dataset's quick sessions)
VARIANTS: dict[str, tuple[str, dict, Corruption, float]] = {
    "baseline": ("dbn", {}, Corruption(), 1.0),
    "appeal_spread_1.0": ("dbn", {"pair_noise": 1.0}, Corruption(), 1.0),
    "appeal_spread_1.5": ("dbn", {"pair_noise": 1.5}, Corruption(), 1.0),
    "appeal_spread_0": ("dbn", {"pair_noise": 0.0}, Corruption(), 1.0),
    "grades_close": ("dbn", {"attractiveness_min": 0.15, "attractiveness_max": 0.35}, Corruption(), 1.0),
    "impatient": ("dbn", {"continue_prob": 0.6}, Corruption(), 1.0),
    "errors_20pct": ("dbn", {}, Corruption(rate=0.2), 1.0),
    "errors_5pct": ("dbn", {}, Corruption(rate=0.05), 1.0),
    "errors_uniform": ("dbn", {}, Corruption(neighbour_share=0.0), 1.0),
    "light_traffic": ("dbn", {}, Corruption(), 1 / 3),
    "pbm_steep_position_decay": ("pbm", {"examination_decay": 2.0}, Corruption(), 1.0),
    "pbm_appeal_spread_1.0": ("pbm", {"pair_noise": 1.0}, Corruption(), 1.0),
    "ranker_sharp": ("dbn", {"rank_noise": 0.3}, Corruption(), 1.0),
    "zipf_steep": ("dbn", {"zipf_exponent": 1.5}, Corruption(), 1.0),
    "trust_bias": ("trust", {"trust_noise": 0.15}, Corruption(), 1.0),
    "trust_bias_strong": ("trust", {"trust_noise": 0.3}, Corruption(), 1.0),
    "patience_by_query": ("dbn", {"query_patience_spread": 0.5}, Corruption(), 1.0),
    "patience_by_query_strong": ("dbn", {"query_patience_spread": 1.0}, Corruption(), 1.0),
    "pbm_patience_by_query": ("pbm", {"query_patience_spread": 0.5}, Corruption(), 1.0),
    "clicky_queries": ("dbn", {"query_appeal_spread": 0.5}, Corruption(), 1.0),
    "clicky_queries_strong": ("dbn", {"query_appeal_spread": 1.0}, Corruption(), 1.0),
    "pbm_clicky_queries": ("pbm", {"query_appeal_spread": 0.5}, Corruption(), 1.0),
    "pages_of_24": ("dbn", {"page_size": 24}, Corruption(), 1.0),
    "pbm_pages_of_24": ("pbm", {"page_size": 24}, Corruption(), 1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="crowdflower", choices=sorted(SESSIONS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}")
    # a run keeps the cells of an earlier run that it does not redo (other datasets, other variants)
    earlier = [cell for cell in earlier_cells(RESULTS_NAME)
               if cell["dataset"] != args.dataset or cell["variant"] not in variants]
    out: dict = {"name": RESULTS_NAME, "command": "python -m bench.bench_audit_stress [--dataset homedepot]",
                 "quick": True, "device": device(), "simulated": True, "labeler": LABELER,
                 "cells": earlier}
    if shared_data_dir() is None:
        out["skipped"] = "../shared/data is absent"
    else:
        settings, retriever = AuditSettings(queue_limit=10**9), zero_shot_cosine()
        for variant in variants:
            click_model, simulation, corruption, traffic = VARIANTS[variant]
            sessions = int(SESSIONS[args.dataset][1] * traffic)
            [cell] = run_dataset(args.dataset, True, args.seed, settings, sessions, click_models=(click_model,),
                                 rankers=(RANKER,), explore_rates=(EXPLORE,), retriever=retriever,
                                 simulation=simulation, corruption=corruption)
            cell.update(variant=variant, simulation=simulation, corruption=vars(corruption), sessions=sessions)
            out["cells"].append(cell)
            print(json.dumps(figure_of(cell)), file=sys.stderr, flush=True)
    out["figures"] = [figure_of(cell) for cell in out["cells"]]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{RESULTS_NAME}.json").write_text(json.dumps(out, indent=2), encoding="utf-8")


def figure_of(cell: dict) -> dict:
    return cell_figure(cell, f"{cell['dataset']} {cell['click_model']}/{cell['ranker']}/explore {cell['explore_rate']}, "
                             f"{cell['variant']}")


if __name__ == "__main__":
    main()
