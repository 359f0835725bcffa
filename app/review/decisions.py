"""Write annotator decisions: append-only, idempotent, with provenance.

A decision is a `labels` row (source 'human', author = annotator id, comment; its policy flags set or
cleared in `label_flags`, written in the same transaction) plus a
`review_events` row saying why the item was shown, when, and whether it changed meanwhile.
Both carry the *decision id* made when the item was shown (`labels.dedup_key` =
'review:<decision id>'), so a retried click never writes twice.

Undo appends a `review_events` row with action 'undo' naming the label taken back. The label
stays in the history; the `live_labels` and `current_labels` views stop counting it, so the
pair's current label falls back to what it was before. A skip is an event too (no label).

Writes go through `Store.transaction()`, which waits its turn while another process (a
`mnr label` batch job) holds the store, so neither side loses a write. When the store has accounts,
each write checks in its transaction that the annotator is an enabled account (an admin, to
adjudicate): the UI passes only the id it authenticated, and a disabled account writes nothing more.

An adjudication is an admin's label on a pair the annotators disagreed on: a human label that
becomes the current one, recorded in `adjudications` with the decisions it settled.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

import duckdb

from app.review.item import ReviewItem
from app.review.settings import check_identity
from labelstore.accounts import check_writer
from labelstore.errors import MnrError
from labelstore.schemes import load_scheme
from labelstore.sqlfiles import sql
from labelstore.store import LabelRecord, Store, utcnow


@dataclass(frozen=True)
class ShownItem:
    """An item as it was put in front of an annotator: the decision id and the pair's newest label then."""

    pair_id: str
    scheme: str
    decision_id: str
    shown_label_id: int | None
    queue_source: str
    shown_at: datetime

    @property
    def dedup_key(self) -> str:
        return f"review:{self.decision_id}"


def show(item: ReviewItem, queue_source: str) -> ShownItem:
    """Record (in memory) that `item` is being shown now; the decision id is made here."""
    return ShownItem(item.pair_id, item.scheme, uuid.uuid4().hex, item.latest_label_id, queue_source, utcnow())


@dataclass(frozen=True)
class DecisionResult:
    """`newer_labels`: (source, label, author) of rows written after the item was shown."""

    label_id: int
    label: str
    written: bool
    newer_labels: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def changed_since_shown(self) -> bool:
        return bool(self.newer_labels)

    def change_message(self) -> str:
        changes = "; ".join(f"{source} label '{label}' by {author}" for source, label, author in self.newer_labels)
        return f"Saved '{self.label}', but this pair changed while you were looking at it: {changes}."


def record_decision(store: Store, shown: ShownItem, annotator: str | None, label: str,
                    comment: str | None = None, allow: tuple[str, ...] = (), vouched: bool = False, *,
                    flag_decisions: dict[str, bool] | None = None,
                    flag_probabilities: dict[str, float] | None = None) -> DecisionResult:
    """Append the annotator's label for `shown`. Saved even when the pair changed since it was shown.

    `flag_decisions` are the policy flags the annotator set (True) or cleared (False); `flag_probabilities`
    the LLM's probabilities they were shown, carried on the human label so that a flag left untouched
    stays as the LLM scored it (`app.review.policy_flags`). Both are written in the label's transaction.

    Raises `IdentityError` without writing when there is no (allowed) identity, `AuthError` when the
    store has accounts and `annotator` is not an enabled one (unless a trusted proxy `vouched` for it),
    `SchemeError` for a label outside the scheme.
    """
    annotator = check_identity(annotator, allow)
    scheme = load_scheme(shown.scheme)
    label = scheme.normalize(label)
    record = LabelRecord(
        pair_id=shown.pair_id, scheme=shown.scheme, label=label, grade=scheme.grade_of(label), source="human",
        author=annotator, comment=(comment or "").strip() or None, dedup_key=shown.dedup_key,
        flags=dict(flag_probabilities) if flag_probabilities else None,
        flag_decisions={flag: bool(value) for flag, value in flag_decisions.items()} if flag_decisions else None,
    )
    with store.transaction() as con:
        check_writer(con, annotator, vouched=vouched)
        newer = con.execute(sql("app.review", "newer_labels"), {
            "pair_id": shown.pair_id, "scheme": shown.scheme, "shown_label_id": shown.shown_label_id or 0,
            "dedup_key": shown.dedup_key,
        }).fetchall()
        written = store.add_labels([record], con=con) == 1
        label_id = con.execute("SELECT label_id FROM labels WHERE dedup_key = ?", [shown.dedup_key]).fetchone()[0]
        _append_event(con, shown.decision_id, "decide", shown, annotator, label_id, changed=bool(newer))
    return DecisionResult(int(label_id), label, written, [(row[1], row[2], row[3]) for row in newer])


def record_skip(store: Store, shown: ShownItem, annotator: str | None, allow: tuple[str, ...] = (),
                vouched: bool = False) -> None:
    """Note that the annotator skipped `shown`: it moves behind everything else in their queue."""
    annotator = check_identity(annotator, allow)
    with store.transaction() as con:
        check_writer(con, annotator, vouched=vouched)
        _append_event(con, f"skip:{shown.decision_id}", "skip", shown, annotator, None, changed=False)


@dataclass(frozen=True)
class UndoneDecision:
    label_id: int
    pair_id: str
    scheme: str
    label: str


def undo_last(store: Store, annotator: str | None, allow: tuple[str, ...] = (),
              vouched: bool = False) -> UndoneDecision | None:
    """Take back the annotator's newest decision that is still live; None when there is none."""
    annotator = check_identity(annotator, allow)
    with store.transaction() as con:
        check_writer(con, annotator, vouched=vouched)
        row = con.execute(sql("app.review", "last_decision"), {"annotator": annotator}).fetchone()
        if row is None:
            return None
        undone = UndoneDecision(int(row[0]), row[1], row[2], row[3])
        shown = ShownItem(undone.pair_id, undone.scheme, "", None, "undo", utcnow())
        _append_event(con, f"undo:{undone.label_id}", "undo", shown, annotator, undone.label_id, changed=False)
    return undone


def undo_decision(store: Store, label_id: int, annotator: str | None, allow: tuple[str, ...] = (),
                  vouched: bool = False) -> None:
    """Take back one of the annotator's own decisions by its label id (idempotent)."""
    annotator = check_identity(annotator, allow)
    with store.transaction() as con:
        check_writer(con, annotator, vouched=vouched)
        row = con.execute("SELECT pair_id, scheme, source, author FROM labels WHERE label_id = ?", [label_id]).fetchone()
        if row is None or row[2] != "human" or row[3] != annotator:
            raise MnrError(f"label {label_id} is not a decision of '{annotator}'; only your own decisions can be undone")
        shown = ShownItem(row[0], row[1], "", None, "undo", utcnow())
        _append_event(con, f"undo:{label_id}", "undo", shown, annotator, label_id, changed=False)


def _append_event(con: duckdb.DuckDBPyConnection, event_id: str, action: str, shown: ShownItem, annotator: str, label_id: int | None,
                  changed: bool) -> None:
    con.execute(sql("app.review", "insert_event"), {
        "event_id": event_id, "action": action, "pair_id": shown.pair_id, "scheme": shown.scheme,
        "annotator": annotator, "label_id": label_id, "queue_source": shown.queue_source,
        "shown_label_id": shown.shown_label_id, "changed_since_shown": changed, "shown_at": shown.shown_at,
        "created_at": utcnow(),
    })


@dataclass(frozen=True)
class Adjudication:
    adjudication_id: str
    label_id: int
    label: str
    decisions: str


def adjudicate(store: Store, pair_id: str, scheme_name: str, admin: str | None, label: str,
               comment: str | None = None) -> Adjudication:
    """The admin's final label for a pair the annotators disagreed on; it becomes the current label.

    Raises `AuthError` unless `admin` is an enabled admin account, `MnrError` when fewer than two
    annotators decided the pair.
    """
    admin = check_identity(admin)
    scheme = load_scheme(scheme_name)
    label = scheme.normalize(label)
    adjudication_id = uuid.uuid4().hex
    record = LabelRecord(pair_id=pair_id, scheme=scheme.name, label=label, grade=scheme.grade_of(label),
                         source="human", author=admin, comment=(comment or "").strip() or None,
                         dedup_key=f"adjudicate:{adjudication_id}")
    with store.transaction() as con:
        check_writer(con, admin, need_admin=True)
        decided = con.execute(sql("app.review", "pair_decisions"), {"pair_id": pair_id, "scheme": scheme.name}).fetchall()
        if len({annotator for annotator, _ in decided}) < 2:
            raise MnrError(f"pair {pair_id} ({scheme.name}) has fewer than two annotators' decisions: nothing to adjudicate")
        store.add_labels([record], con=con)
        label_id = con.execute("SELECT label_id FROM labels WHERE dedup_key = ?", [record.dedup_key]).fetchone()[0]
        settled = "; ".join(f"{annotator}={decision}" for annotator, decision in decided)
        con.execute(sql("app.review", "insert_adjudication"), {
            "adjudication_id": adjudication_id, "pair_id": pair_id, "scheme": scheme.name, "admin": admin,
            "label_id": label_id, "label": label, "decisions": settled, "created_at": utcnow(),
        })
    return Adjudication(adjudication_id, int(label_id), label, settled)
