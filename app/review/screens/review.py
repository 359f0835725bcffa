"""The review page: the best queued pair with its evidence, its policy flags, the label buttons, skip and undo.

A Streamlit page script, run by the navigation in `app/review/ui.py`; the shared state is in `app.review.views`.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pandas as pd
import streamlit as st

from app.review.decisions import record_decision, record_skip, show, undo_last
from app.review.item import ReviewItem, load_item, scheme_of_pair
from app.review.policy_flags import ItemFlags, item_flags, toggle
from app.review.queue import is_blind
from app.review.views import (
    annotator, done, focus_on, is_admin, notify, queue, remaining, require_identity, settings, show_notices, store,
    vouched,
)
from labelstore.errors import MnrError
from labelstore.schemes import LabelScheme, load_scheme

SKIP_SHORTCUT = "S"
UNDO_SHORTCUT = "U"


def _guarded(action: Callable[[], None]) -> None:
    try:
        action()
    except MnrError as exc:
        notify("error", str(exc))


def _show_item(item: ReviewItem, source: str, reason: str) -> None:
    st.session_state["mnr_current"] = {"item": item, "shown": show(item, source), "source": source, "reason": reason,
                                       "flags": item_flags(item)}


def _pending_flags(decision_id: str) -> dict[str, bool]:
    """The flags the reviewer set (True) or cleared (False) on the item on screen, not yet saved."""
    return st.session_state.get(f"mnr_flags_{decision_id}", {})


def _toggle_flag(decision_id: str, flag: str, value: bool) -> None:
    st.session_state[f"mnr_flags_{decision_id}"] = toggle(_pending_flags(decision_id), flag, value)


def _next_item() -> None:
    """Put the best item not yet done on screen (reloading the queue once when it runs dry), or nothing."""
    st.session_state.pop("mnr_current", None)
    focus = st.session_state.pop("mnr_focus", None)
    if focus is not None:
        pair_id, scheme, source = focus
        scheme = scheme or scheme_of_pair(store(), pair_id, settings().default_scheme)
        try:
            _show_item(load_item(store(), pair_id, scheme), source, f"opened from the {source} page")
            return
        except MnrError as exc:
            notify("error", f"{exc}; showing the next item in the queue instead")
    left = remaining(queue())
    if left.empty:
        left = remaining(queue(refresh=True))
    if left.empty:
        return
    row = left.iloc[0]
    _show_item(load_item(store(), row["pair_id"], row["scheme"]), row["source"], row["reason"])


def _decide(label: str) -> None:
    current = st.session_state.get("mnr_current")
    if current is None:
        return
    shown = current["shown"]
    comment = st.session_state.get(f"mnr_comment_{shown.decision_id}")

    flags: ItemFlags = current["flags"]

    def write() -> None:
        result = record_decision(store(), shown, annotator(), label, comment, settings().allow, vouched(),
                                 flag_decisions=_pending_flags(shown.decision_id),
                                 flag_probabilities=flags.probabilities)
        done().add((shown.pair_id, shown.scheme))
        st.session_state["mnr_decided"] = st.session_state.get("mnr_decided", 0) + 1
        if result.changed_since_shown:
            notify("warning", result.change_message())
        else:
            notify("success", f"Saved '{result.label}'{_flags_note(_pending_flags(shown.decision_id))} "
                              f"for “{current['item'].query}”.")
        _next_item()

    _guarded(write)


def _skip() -> None:
    current = st.session_state.get("mnr_current")
    if current is None:
        return
    shown = current["shown"]

    def write() -> None:
        record_skip(store(), shown, annotator(), settings().allow, vouched())
        done().add((shown.pair_id, shown.scheme))
        notify("info", f"Skipped “{current['item'].query}”.")
        _next_item()

    _guarded(write)


def _undo() -> None:
    def write() -> None:
        undone = undo_last(store(), annotator(), settings().allow, vouched())
        if undone is None:
            notify("info", "Nothing to undo: you have no decision left to take back.")
            return
        done().discard((undone.pair_id, undone.scheme))
        st.session_state["mnr_decided"] = max(0, st.session_state.get("mnr_decided", 0) - 1)
        notify("success", f"Undid your '{undone.label}'; the pair is shown again.")
        focus_on(undone.pair_id, undone.scheme, "undo")
        _next_item()

    _guarded(write)


def _reset_skips() -> None:
    st.session_state["mnr_done"] = set()
    queue(refresh=True)



def review_page() -> None:
    name = require_identity()
    if "pair" in st.query_params:
        focus_on(st.query_params["pair"], st.query_params.get("scheme"), "audit")
        st.query_params.clear()
    if "mnr_current" not in st.session_state:
        _next_item()
    show_notices()
    current = st.session_state.get("mnr_current")
    frame = queue()
    left = len(remaining(frame))
    decided = st.session_state.get("mnr_decided", 0)
    if current is None:
        st.success(f"Nothing left to review for {name} with these filters. Decided in this session: {decided}.")
        if st.session_state.get("mnr_done"):
            st.button("Show skipped items again", on_click=_reset_skips)
        st.button(f"Undo last decision ({UNDO_SHORTCUT})", key="mnr_undo", shortcut=UNDO_SHORTCUT, on_click=_undo)
        return
    item: ReviewItem = current["item"]
    scheme = load_scheme(item.scheme)
    position = decided + 1
    total = decided + max(left, 1)
    st.caption(f"Item {position} of {total} · queued as **{current['source']}**: {current['reason']} · "
               f"scheme {scheme.name} · dataset {item.dataset}")
    st.markdown(f"### Query: “{item.query}”")
    content, evidence = st.columns([3, 2], gap="large")
    with content:
        _product(item)
        _definitions(scheme)
    review_settings = settings()
    blind = is_blind(store(), item.pair_id, item.scheme, review_settings)
    hide_llm = blind and review_settings.blind_llm
    with evidence:
        if hide_llm:
            st.markdown("**LLM label:** hidden until you decide (blind overlap item)")
        else:
            _llm_label(item, scheme)
        _engagement(item)
        _earlier_humans(item, name, blind=blind, own_only=not is_admin())
    decision_id = current["shown"].decision_id
    standing = item.standing_flag_decisions(partial(_visible_decision, me=name, blind=blind, admin=is_admin()))
    _policy_flags(current["flags"], decision_id, hide_llm, standing)
    _decision_buttons(scheme, decision_id, current["flags"])


def _product(item: ReviewItem) -> None:
    st.markdown(f"**Product:** {item.title}")
    if item.brand:
        st.markdown(f"**Brand:** {item.brand}")
    st.markdown(f"**Description:** {item.description or '_none given_'}")
    reference = item.reference_label
    if reference is not None:
        st.caption(f"Dataset label ({reference['source']}): {reference['label']}")


def _definitions(scheme: LabelScheme) -> None:
    st.markdown("**Label definitions (policy)**")
    lines = [f"- **{index}** · **{label.name}** — {label.definition}" for index, label in enumerate(scheme.labels, 1)]
    st.markdown("\n".join(lines))


def _llm_label(item: ReviewItem, scheme: LabelScheme) -> None:
    llm = item.llm_label
    if llm is None:
        st.markdown("**LLM label:** none yet")
        return
    confidence = f" ({llm['confidence']:.0%})" if pd.notna(llm["confidence"]) else ""
    st.markdown(f"**LLM label:** {llm['label']}{confidence}")
    probs = item.llm_probs
    for name in scheme.label_names:
        if name in probs:
            st.progress(min(max(probs[name], 0.0), 1.0), text=f"{name} {probs[name]:.0%}")
    st.caption(f"by {llm['author']}")


def _engagement(item: ReviewItem) -> None:
    evidence = item.engagement
    st.markdown("**Engagement**" + (" (simulated)" if evidence.simulated else ""))
    if not evidence.impressions:
        st.caption("No engagement logged for this pair.")
        return
    impressions, ctr, coec, cart = st.columns(4)
    impressions.metric("Impressions", f"{evidence.impressions:,}")
    ctr.metric("CTR", f"{evidence.ctr:.0%}" if evidence.ctr is not None else "–")
    coec.metric("COEC", f"{evidence.coec:.2f}" if evidence.coec is not None else "–",
                help="Clicks over expected clicks at the positions shown: above 1 means clicked more than its position predicts.")
    cart.metric("Add to cart", f"{evidence.add_to_cart:,}")


def _earlier_humans(item: ReviewItem, me: str, blind: bool, own_only: bool) -> None:
    """The pair's human labels; only the reviewer's own on a blind item or for an annotator (not an admin)."""
    humans = item.human_labels
    st.markdown("**Earlier human labels**")
    if blind or own_only:
        others = int((humans["author"] != me).sum()) if not humans.empty else 0
        humans = humans[humans["author"] == me] if not humans.empty else humans
        if others:
            why = "a blind overlap item, for the agreement numbers" if blind else "annotators see only their own"
            st.caption(f"{others} by others hidden: {why}.")
    if humans.empty:
        st.caption("None.")
        return
    shown = humans.assign(when=humans["created_at"].astype(str).str[:16],
                          flags=[_flags_text(item.flag_decisions(label_id)) for label_id in humans["label_id"]])
    shown["label"] = shown["label"].where(~shown["undone"], shown["label"] + " (undone)")
    columns = ["label", "author", "when", "comment"] + (["flags"] if shown["flags"].str.len().gt(0).any() else [])
    st.dataframe(shown[columns], hide_index=True, width="stretch")


def _flags_text(decisions: dict[str, bool]) -> str:
    return ", ".join(f"{flag} {'set' if value else 'cleared'}" for flag, value in sorted(decisions.items()))


def _flags_note(decisions: dict[str, bool]) -> str:
    return f" ({_flags_text(decisions)})" if decisions else ""


def _visible_decision(label: pd.Series, *, me: str, blind: bool, admin: bool) -> bool:
    """Whether the reviewer may see the flag decisions of the earlier human or import `label`: their own
    always; the dataset's (import) and other annotators' (for an admin) unless the item is blind."""
    if label["source"] == "human" and label["author"] == me:
        return True
    return not blind and (label["source"] == "import" or admin)


def _policy_flags(flags: ItemFlags, decision_id: str, hide_llm: bool,
                  standing: dict[str, tuple[bool, str]] | None = None) -> None:
    """Each flag of the item's policy with the LLM's probability, the pair's standing decision (when the
    reviewer may see it) and its set / clear buttons."""
    if not flags.flags:
        return
    st.markdown(f"**Policy flags** (policy {flags.policy}): set or clear a flag, then choose the label")
    if flags.note:
        st.caption(flags.note)
    pending = _pending_flags(decision_id)
    for flag in flags.flags:
        text, set_column, clear_column = st.columns([4, 1, 1], vertical_alignment="center")
        if hide_llm:
            llm = "LLM: hidden until you decide"
        elif flag.probability is None:
            llm = "LLM: not scored"
        else:
            llm = f"LLM: {flag.probability:.0%}"
        if flag.name in (standing or {}):
            decision, author = standing[flag.name]
            llm += f" · standing: {'set' if decision else 'cleared'} by {author}"
        state = {True: "**set** by you", False: "**cleared** by you"}.get(pending.get(flag.name), "untouched")
        text.markdown(f"**{flag.name}** · {llm} · {state}", help=flag.definition)
        key = flag.key
        # the row names the flag, so the buttons can be short enough to show their keys
        set_column.button("Set", key=f"mnr_flag_set_{flag.name}", shortcut=key, on_click=_toggle_flag,
                          args=(decision_id, flag.name, True), width="stretch", help=f"Set {flag.name}",
                          type="primary" if pending.get(flag.name) is True else "secondary")
        clear_column.button("Clear", key=f"mnr_flag_clear_{flag.name}",
                            shortcut=f"Shift+{key}" if key else None, on_click=_toggle_flag,
                            args=(decision_id, flag.name, False), width="stretch", help=f"Clear {flag.name}",
                            type="primary" if pending.get(flag.name) is False else "secondary")


def _decision_buttons(scheme: LabelScheme, decision_id: str, flags: ItemFlags) -> None:
    st.text_input("Comment (optional)", key=f"mnr_comment_{decision_id}")
    columns = st.columns(len(scheme.labels) + 2)
    for index, (column, label) in enumerate(zip(columns, scheme.labels), 1):
        column.button(label.name, key=f"mnr_label_{label.name}", shortcut=str(index), on_click=_decide,
                      args=(label.name,), type="primary", width="stretch", help=label.definition)
    columns[-2].button("Skip", key="mnr_skip", shortcut=SKIP_SHORTCUT, on_click=_skip, width="stretch")
    columns[-1].button("Undo last", key="mnr_undo", shortcut=UNDO_SHORTCUT, on_click=_undo, width="stretch")
    keys = [flag.key for flag in flags.flags if flag.key]
    flag_keys = (f" · {'/'.join(keys)} set a flag, Shift+{'/'.join(keys)} clear it (press again: untouched)"
                 if keys else "")
    st.caption(f"Keys: 1–{len(scheme.labels)} label{flag_keys} · {SKIP_SHORTCUT} skip · {UNDO_SHORTCUT} undo last")


review_page()
