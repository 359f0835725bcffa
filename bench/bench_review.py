"""Review UI throughput with accounts: decisions per minute in a scripted Chromium session.

An annotator account logs in through the sidebar and decides 50 queued items by keyboard (the label
shortcuts 1-4). Then every write is checked for attribution: each human label written has a `decide`
event by the same, authenticated, annotator. A second browser session with a wrong token must write
nothing. Synthetic catalog (labelstore.catalog), no shared data needed. The run takes about a minute,
so `--quick` changes nothing. Timings include Streamlit's rerun after each key on a shared 2-core machine.

    python -m bench.bench_review [--quick]
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.common import parse_args, write_result
from bench.review_browser import CHROMIUM, CHROMIUM_ARGS, log_in, serve_review, wait_until_idle
from labelstore import LabelRecord, Store
from labelstore.accounts import add_account
from labelstore.catalog import generate_catalog, write_catalog
from labelstore.schemes import load_scheme

NAME = "review"
DECISIONS = 50
ESCI = load_scheme("esci")


def build_store(path: Path, items: int) -> Store:
    """A generated catalog with `items` pairs the LLM labelled at low confidence: all queued as uncertain."""
    store = Store(path)
    write_catalog(store, generate_catalog(n_families=12, seed=0))
    pairs = [row[0] for row in store.fetchall("SELECT pair_id FROM pairs ORDER BY pair_id LIMIT ?", [items])]
    if len(pairs) < items:
        raise SystemExit(f"the generated catalog has only {len(pairs)} pairs, {items} needed")
    labels = ESCI.label_names
    store.add_labels([
        LabelRecord(pair_id=pair, scheme="esci", label=labels[i % len(labels)], grade=ESCI.grade_of(labels[i % len(labels)]),
                    source="llm", author="llm:bench", confidence=0.3,
                    probs={name: 0.3 if name == labels[i % len(labels)] else 0.7 / (len(labels) - 1) for name in labels})
        for i, pair in enumerate(pairs)
    ])
    return store


def write_rows(store: Store) -> tuple[int, int]:
    return (store.scalar("SELECT count(*) FROM labels WHERE source = 'human'"),
            store.scalar("SELECT count(*) FROM review_events"))


def attribution(store: Store) -> dict[str, int]:
    """Human labels, those with a matching decide event by the same annotator, and events by a non-account."""
    return {
        "human_labels": store.scalar("SELECT count(*) FROM labels WHERE source = 'human'"),
        "attributed": store.scalar(
            "SELECT count(*) FROM labels l JOIN review_events e ON e.label_id = l.label_id AND e.action = 'decide' "
            "JOIN accounts a ON a.name = e.annotator AND NOT a.disabled WHERE l.source = 'human' AND l.author = e.annotator"),
        "events_by_non_accounts": store.scalar(
            "SELECT count(*) FROM review_events WHERE annotator NOT IN (SELECT name FROM accounts)"),
    }


def session(url: str, token: str, decisions: int) -> tuple[float, float]:
    """Log in, decide `decisions` items by keyboard; (seconds to the first item, seconds for the decisions)."""
    import playwright.sync_api as sync_api

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            started = time.perf_counter()
            page.goto(url)
            log_in(page, "alice", token)
            page.get_by_text("Item 1 of").first.wait_for(timeout=120_000)
            wait_until_idle(page)
            first_item = time.perf_counter() - started
            started = time.perf_counter()
            for done in range(decisions):
                page.locator("h3").first.click()  # keys go to the page, not the comment field
                page.keyboard.press(str(done % 4 + 1))
                page.get_by_text(f"Item {done + 2} of").first.wait_for(timeout=60_000)
            elapsed = time.perf_counter() - started
            # a second session with a wrong token sees no decision buttons and writes nothing
            intruder = browser.new_page()
            intruder.goto(url)
            log_in(intruder, "alice", token + "x")
            intruder.get_by_text("name or token not accepted").wait_for(timeout=60_000)
            if intruder.locator('[class*="st-key-mnr_label_"] button').count():
                raise AssertionError("decision buttons shown without a valid token")
            return first_item, elapsed
        finally:
            browser.close()


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    with tempfile.TemporaryDirectory(prefix="bench-review-") as folder:
        root = Path(folder)
        store = build_store(root / "review.duckdb", DECISIONS + 10)
        token = add_account(store, "alice", "annotator")
        add_account(store, "ann", "admin")
        config = root / "mnr.toml"
        config.write_text("[review]\noverlap = 0.0\n", encoding="utf-8")
        with serve_review(store.path, config, root / "server.log") as url:
            first_item, elapsed = session(url, token, DECISIONS)
        counts = attribution(store)
        failed_logins = store.scalar("SELECT count(*) FROM account_events WHERE action = 'login_failed'")
    per_minute = DECISIONS / elapsed * 60
    refused = failed_logins == 1 and counts["human_labels"] == DECISIONS
    all_attributed = counts["human_labels"] == DECISIONS == counts["attributed"] and not counts["events_by_non_accounts"]
    write_result(NAME, args.quick, f"generated catalog (labelstore.catalog, 12 families), {DECISIONS} queued items", [
        {"name": f"decisions per minute, {DECISIONS} items by keyboard after login (Chromium, one annotator)",
         "value": round(per_minute, 1), "unit": "decisions/min", "target": "",
         "anchor": f"{elapsed:.1f} s for {DECISIONS}; login to first item {first_item:.1f} s"},
        {"name": "every write attributed to the logged-in account", "value": all_attributed, "unit": "bool",
         "target": "true", "anchor": f"{counts['attributed']} of {counts['human_labels']} human labels"},
        {"name": "no write with a wrong token", "value": refused, "unit": "bool", "target": "true",
         "anchor": "a second session with a wrong token: refused, no decision buttons, nothing written"},
    ], decisions=DECISIONS, seconds=elapsed, login_to_first_item_s=first_item, **counts)
    if not all_attributed:
        raise SystemExit("not every write was attributed")


if __name__ == "__main__":
    main()
