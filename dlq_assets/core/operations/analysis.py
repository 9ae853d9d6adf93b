"""Failure patterns of the DLQ: which reasons, sources and errors fill it, what repairs them, and when.

One query reads the columns that matter from both ``dead_letter_events`` and ``dlq_poison_events`` (never the
payload); every breakdown after that is a pandas group-by over that one frame, so the numbers always add up.
Plain Python: the Dagster asset and the CLI call it, it never imports Dagster.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import psycopg

NONE = "(none)"  # label for a missing source, or an event that never recorded an error
STATUSES = ("unresolved", "resolved", "poisoned", "quarantined")  # each event is in exactly one
COLUMNS = (
    "kind", "id", "status", "reason", "source", "classification", "priority", "created_at", "resolution_method",
    "retry_count", "error_class", "payload_form", "poison_reason",
)  # fmt: skip
_LABELS = ("kind", "reason", "source", "classification", "resolution_method", "error_class", "payload_form",
           "poison_reason")  # fmt: skip
_INTEGERS = ("id", "priority", "retry_count")
PATTERN_KEYS = ["reason", "error_class", "source"]
_CHUNK_ROWS = 50_000

# One SELECT per table, unified in SQL; 'kind' says which table a row came from. Status partitions the events:
# quarantined ones are not resolved, so they are counted apart from the pending (unresolved) backlog.
_QUERY = """
SELECT kind, id, status, reason, source, classification, priority, created_at, resolution_method, retry_count,
       error_class, payload_form, poison_reason
  FROM (SELECT 'dead_letter' AS kind, id,
               CASE WHEN resolved THEN 'resolved' WHEN quarantined_at IS NOT NULL THEN 'quarantined'
                    ELSE 'unresolved' END AS status,
               reason, coalesce(source, '{none}') AS source, classification, priority, created_at,
               resolution_method, retry_count,
               coalesce(error_history -> -1 ->> 'error_class', '{none}') AS error_class,
               metadata_json ->> 'payload_form' AS payload_form, NULL::text AS poison_reason
          FROM dead_letter_events {where}
        UNION ALL
        SELECT 'poison', id, 'poisoned', reason, coalesce(source, '{none}'), classification, priority, created_at,
               resolution_method, retry_count, coalesce(error_history -> -1 ->> 'error_class', poison_reason),
               metadata_json ->> 'payload_form', poison_reason
          FROM dlq_poison_events {where}) failures
 ORDER BY created_at DESC, id DESC
 LIMIT %(limit)s
"""


@dataclass(frozen=True, eq=False)
class FailurePatterns:
    total_events: int
    unresolved: int
    resolved: int
    poisoned: int
    quarantined: int
    by_reason: pd.DataFrame  # reason, events, unresolved, resolved, poisoned, quarantined, share
    by_source: pd.DataFrame  # source, events, unresolved (the top sources)
    by_error_class: pd.DataFrame  # error_class, events
    by_strategy: pd.DataFrame  # resolution_method, events (resolved events only)
    by_hour: pd.DataFrame  # hour (UTC), events, unresolved
    top_patterns: pd.DataFrame  # reason, error_class, source, events, unresolved, share, example_id
    by_hour_reason: pd.DataFrame  # hour, reason, events: what the chart stacks
    truncated: bool = False  # limit_rows cut the read: the numbers cover only the newest rows

    def as_markdown(self, limit: int = 10) -> str:
        """The tables an operator reads, each cut to ``limit`` rows (by hour: the latest ``limit`` hours)."""
        lines = [
            "## DLQ failure patterns",
            "",
            f"**{self.total_events} events**: {self.unresolved} unresolved, {self.resolved} resolved, "
            f"{self.poisoned} poisoned, {self.quarantined} quarantined.",
        ]
        if self.truncated:
            lines.append("_Only the newest rows were read (limit_rows): older events are not counted._")
        sections = [
            ("By reason", self.by_reason.head(limit)),
            ("Top patterns", self.top_patterns.head(limit)),
            ("By error class", self.by_error_class.head(limit)),
            ("By strategy", self.by_strategy.head(limit)),
            ("By source", self.by_source.head(limit)),
            ("By hour (UTC)", self.by_hour.tail(limit)),
        ]
        for title, frame in sections:
            lines += ["", f"### {title}", "", markdown_table(frame)]
        return "\n".join(lines) + "\n"

    def summary(self) -> dict[str, int | float]:
        """Flat numbers for Dagster metadata and JSON output."""
        total = self.total_events
        top = self.top_patterns
        return {
            "total_events": total,
            "unresolved": self.unresolved,
            "resolved": self.resolved,
            "poisoned": self.poisoned,
            "quarantined": self.quarantined,
            "resolution_rate": round(self.resolved / total, 4) if total else 0.0,
            "poison_rate": round(self.poisoned / total, 4) if total else 0.0,
            "reasons": len(self.by_reason),
            "error_classes": int((self.by_error_class["error_class"] != NONE).sum()),
            "strategies": len(self.by_strategy),
            "hours": len(self.by_hour),
            "top_reason_share": round(float(self.by_reason["share"].iloc[0]), 4) if total else 0.0,
            "top_pattern_events": int(top["events"].iloc[0]) if total else 0,
            "top_pattern_share": round(float(top["share"].iloc[0]), 4) if total else 0.0,
            "truncated": int(self.truncated),
        }


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table (numbers right-aligned); built here so no tabulate dependency is needed."""
    if frame.empty:
        return "_none_"
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    rows = [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    return "\n".join(
        [
            "| " + " | ".join(str(c) for c in frame.columns) + " |",
            "| " + " | ".join("---:" if n else "---" for n in numeric) + " |",
            *("| " + " | ".join(row) + " |" for row in rows),
        ]
    )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1%}"  # the only floats in these tables are shares
    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%d %H:%MZ")
    return str(value).replace("|", "\\|").replace("\n", " ")


def load_failure_frame(
    conn: psycopg.Connection[Any], *, since: datetime | None = None, limit_rows: int = 1_000_000
) -> pd.DataFrame:
    """Every dead letter and poisoned event created at or after ``since``, one row each (``COLUMNS``).

    Memory is bounded by ``limit_rows``: at most that many rows are read (the newest first), through a
    server-side cursor in chunks, with text columns stored as categories (well under 100 bytes a row). When
    the limit cut the read, ``frame.attrs["truncated"]`` is True. A naive ``since`` is taken as UTC.
    """
    if limit_rows < 1:
        raise ValueError("limit_rows must be positive")
    params: dict[str, Any] = {"limit": limit_rows + 1}
    where = ""
    if since is not None:
        params["since"] = since if since.tzinfo else since.replace(tzinfo=UTC)
        where = "WHERE created_at >= %(since)s"
    chunks: list[pd.DataFrame] = []
    read = 0
    with conn.transaction(), conn.cursor(name="dlq_failure_frame") as cur:
        cur.execute(_QUERY.format(where=where, none=NONE), params)
        while read < limit_rows and (rows := cur.fetchmany(min(_CHUNK_ROWS, limit_rows - read))):
            chunks.append(_typed(pd.DataFrame(rows, columns=list(COLUMNS))))
            read += len(rows)
        truncated = read == limit_rows and cur.fetchone() is not None
    frame = _concat(chunks) if chunks else _typed(pd.DataFrame(columns=list(COLUMNS)))
    frame.attrs["truncated"] = truncated
    return frame


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    for column in _INTEGERS:
        frame[column] = frame[column].astype("int64")
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True).astype("datetime64[us, UTC]")
    for column in _LABELS:
        frame[column] = frame[column].astype(object).astype("category")
    frame["status"] = pd.Categorical(frame["status"], categories=STATUSES)
    return frame


def _concat(chunks: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate chunks, keeping the text columns categorical (pandas falls back to strings otherwise)."""
    for column in _LABELS:
        categories = sorted(set().union(*(chunk[column].cat.categories for chunk in chunks)))
        for chunk in chunks:
            chunk[column] = chunk[column].cat.set_categories(categories)
    return pd.concat(chunks, ignore_index=True)


def analyze(
    conn: psycopg.Connection[Any], *, since: datetime | None = None, top: int = 10, limit_rows: int = 1_000_000
) -> FailurePatterns:
    """Read the failures once (see ``load_failure_frame``) and break them down."""
    return patterns_from_frame(load_failure_frame(conn, since=since, limit_rows=limit_rows), top=top)


def patterns_from_frame(frame: pd.DataFrame, *, top: int = 10) -> FailurePatterns:
    """Every breakdown from a ``load_failure_frame`` frame: pure pandas, so it can be tested without a database."""
    total = len(frame)
    hours = frame.assign(hour=frame["created_at"].dt.floor("h"))
    resolved = frame[frame["status"] == "resolved"]
    resolved = resolved.assign(resolution_method=resolved["resolution_method"].astype(str).fillna(NONE))
    by_hour = _grouped(hours, ["hour"], total)[["hour", "events", "unresolved"]]
    by_hour_reason = _grouped(hours, ["hour", "reason"], total)[["hour", "reason", "events"]]
    patterns = _grouped(frame, PATTERN_KEYS, total)[[*PATTERN_KEYS, "events", "unresolved", "share", "example_id"]]
    counts = frame["status"].value_counts()
    return FailurePatterns(
        total_events=total,
        **{status: int(counts[status]) for status in STATUSES},
        by_reason=_grouped(frame, ["reason"], total)[["reason", "events", *STATUSES, "share"]],
        by_source=_grouped(frame, ["source"], total)[["source", "events", "unresolved"]].head(top),
        by_error_class=_grouped(frame, ["error_class"], total)[["error_class", "events"]],
        by_strategy=_grouped(resolved, ["resolution_method"], total)[["resolution_method", "events"]],
        by_hour=by_hour.sort_values("hour", ignore_index=True),
        top_patterns=patterns.head(top),
        by_hour_reason=by_hour_reason.sort_values(["hour", "reason"], ignore_index=True),
        truncated=bool(frame.attrs.get("truncated", False)),
    )


def _grouped(frame: pd.DataFrame, keys: list[str], total: int) -> pd.DataFrame:
    """Per group: events, a count per status, share of all events and the lowest event id; biggest first."""
    flags = pd.get_dummies(frame["status"], dtype="int64")  # one column per status, even on an empty frame
    grouped = (
        frame[keys]
        .join(flags)
        .assign(events=1, example_id=frame["id"])
        .groupby(keys, observed=True)
        .agg(events=("events", "sum"), **{s: (s, "sum") for s in STATUSES}, example_id=("example_id", "min"))
        .reset_index()
    )
    for key in keys:
        if isinstance(grouped[key].dtype, pd.CategoricalDtype):
            grouped[key] = grouped[key].astype(str)
    grouped["share"] = grouped["events"] / total if total else 0.0
    grouped = grouped.astype({"events": "int64", **dict.fromkeys(STATUSES, "int64"), "example_id": "int64"})
    return grouped.sort_values(["events", *keys], ascending=[False, *[True] * len(keys)], ignore_index=True)


def chart_png(patterns: FailurePatterns, *, dpi: int = 100) -> bytes:
    """Failures per UTC hour stacked by reason, and the top error classes, as a PNG.

    Renders on an explicit Agg canvas (no pyplot, no global backend switch), so it is safe in any process.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # Reasons and error classes come from outside: "$x^$" is text to show, never mathtext to render (or fail on).
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        fig = Figure(figsize=(11, 7), layout="constrained")
        FigureCanvasAgg(fig)
        if patterns.total_events == 0:
            ax = fig.add_subplot()
            ax.text(0.5, 0.5, "no failures", ha="center", va="center", fontsize=18, transform=ax.transAxes)
            ax.set_axis_off()
        else:
            hours_ax, classes_ax = fig.subplots(2, 1, height_ratios=[3, 2])
            table = patterns.by_hour_reason.pivot_table(
                index="hour", columns="reason", values="events", aggfunc="sum", fill_value=0
            )
            order = table.sum().sort_values(ascending=False).index
            if len(order) > 8:  # a readable legend: the smaller reasons fold into one
                table = table[order[:7]].assign(**{"(other reasons)": table[order[7:]].sum(axis=1)})
            else:
                table = table[order]
            x = table.index.tz_convert(None).to_pydatetime()
            bottoms = table.cumsum(axis=1) - table
            for reason in table.columns:
                hours_ax.bar(x, table[reason], width=pd.Timedelta(minutes=50).to_pytimedelta(), align="edge",
                             bottom=bottoms[reason], label=reason)  # fmt: skip
            locator = AutoDateLocator()
            hours_ax.xaxis.set_major_locator(locator)
            hours_ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
            hours_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            hours_ax.set(title="Failures per hour (UTC, by created_at), by reason", ylabel="events")
            hours_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
            classes = patterns.by_error_class[patterns.by_error_class["error_class"] != NONE].head(10)
            if classes.empty:
                classes_ax.text(
                    0.5, 0.5, "no errors recorded", ha="center", va="center", transform=classes_ax.transAxes
                )
                classes_ax.set_axis_off()
            else:
                classes_ax.barh(classes["error_class"][::-1], classes["events"][::-1], color="tab:red")
                classes_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                classes_ax.set(title="Top error classes (last recorded error)", xlabel="events")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
