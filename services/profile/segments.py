"""The segment filter language: parsed, validated and compiled to one SQL query over persons'
summaries (docs/audiences.md has the grammar and every field).

    orders(90d) >= 2 and consent.whatsapp and aov > 80
    lifecycle_stage in (at_risk, churned) or (rfm.r <= 2 and rfm.f >= 3)
    tags has "vip" and not unsubscribed and clicks(30d, email) > 0
"""

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, NoReturn

from sqlalchemy import ColumnElement, Select, and_, case, false, func, not_, or_, select, true

from services.profile.store import (
    EventRow,
    OrderRow,
    PersonAnchorRow,
    RefundRow,
    SignalRow,
    SummaryRow,
    TagRow,
)

MAX_FILTER = 2000
MAX_WINDOW_DAYS = 3650
STAGES = ("new", "engaged", "converted", "loyal", "at_risk", "churned")
SOURCES = ("online", "pos", "marketplace")
CHANNELS = ("email", "sms", "whatsapp", "push")
TOKEN = re.compile(
    r"\s*(?:(?P<number>\d+(?:\.\d+)?)(?P<unit>d\b)?|(?P<string>\"[^\"]*\"|'[^']*')"
    r"|(?P<op><=|>=|!=|=|<|>|\(|\)|,)|(?P<word>[A-Za-z_][A-Za-z0-9_.\-]*))"
)
COMPARISONS = ("=", "!=", "<", "<=", ">", ">=")

S, G = SummaryRow, SignalRow


class FilterError(ValueError):
    """A filter that does not parse or does not type-check, with where it went wrong."""

    def __init__(self, position: int, token: str, expected: str) -> None:
        shown = f"'{token}'" if token else "the end"
        super().__init__(f"at position {position} ({shown}): {expected}")


@dataclass(frozen=True)
class Token:
    kind: str  # number, days, string, op, word, end
    text: str
    position: int

    @property
    def value(self) -> str:
        return self.text[1:-1] if self.kind == "string" else self.text


@dataclass(frozen=True)
class Field:
    """A field a filter can compare: its column and what values it takes."""

    column: Any
    type: str  # number, bool, enum, text, days_since
    values: tuple[str, ...] = ()


FIELDS: dict[str, Field] = {
    "orders": Field(S.order_count, "number"),
    "spend": Field(S.spend, "number"),
    "aov": Field(S.aov, "number"),
    "online_orders": Field(S.online_orders, "number"),
    "pos_orders": Field(S.pos_orders, "number"),
    "marketplace_orders": Field(S.marketplace_orders, "number"),
    "days_since_last_order": Field(S.last_order_at, "days_since"),
    "days_since_first_order": Field(S.first_order_at, "days_since"),
    "currency": Field(S.currency, "text"),
    "acquisition": Field(S.acquisition, "enum", SOURCES),
    "location": Field(S.location, "text"),
    "preferred_category": Field(S.preferred_category, "text"),
    "unsubscribed": Field(S.unsubscribed, "bool"),
    "app_installed": Field(S.app_installed, "bool"),
    "loyalty_member": Field(S.loyalty_member, "bool"),
    "tier": Field(S.tier, "text"),
    "lifetime_points": Field(S.lifetime_points, "number"),
    "lifecycle_stage": Field(G.lifecycle_stage, "enum", STAGES),
    "rfm.r": Field(G.rfm_r, "number"),
    "rfm.f": Field(G.rfm_f, "number"),
    "rfm.m": Field(G.rfm_m, "number"),
    "churn_risk": Field(G.churn_risk, "number"),
    "engagement": Field(G.engagement, "number"),
    **{f"consent.{c}": Field(getattr(S, f"consent_{c}"), "bool") for c in CHANNELS},
}
# Counts and sums over a time window: name -> (what, event kind); `orders(90d, pos)`,
# `clicks(30d, email)`.
WINDOWED = {
    "orders": ("orders", ""),
    "spend": ("spend", ""),
    "visits": ("events", "visit"),
    "opens": ("events", "open"),
    "clicks": ("events", "click"),
    "replies": ("events", "reply"),
    "dismisses": ("events", "dismiss"),
}


def tokenize(text: str) -> list[Token]:
    tokens, position = [], 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = TOKEN.match(text, position)
        if match is None or match.end() == position:
            start = position + len(text[position:]) - len(text[position:].lstrip())
            raise FilterError(start, text[start : start + 10], "unexpected character")
        group = next(k for k in ("number", "string", "op", "word") if match.group(k) is not None)
        kind = "days" if group == "number" and match.group("unit") else group
        end = match.end("unit") if kind == "days" else match.end(group)
        tokens.append(Token(kind, text[match.start(group) : end], match.start(group)))
        position = match.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


@dataclass(frozen=True)
class Window:
    """A windowed count or sum, compiled to one grouped subquery joined to the summaries."""

    what: str
    kind: str
    days: int
    qualifier: str


class Compiler:
    """A recursive-descent parser that builds the SQL condition as it goes."""

    def __init__(self, text: str, shop_id: str, now: datetime) -> None:
        if not text.strip():
            raise FilterError(0, "", "expected a condition")
        if len(text) > MAX_FILTER:
            raise FilterError(MAX_FILTER, "", f"a filter has at most {MAX_FILTER} characters")
        self._tokens = tokenize(text)
        self._at = 0
        self._shop_id = shop_id
        self._now = now
        self.windows: dict[Window, Any] = {}

    # --- the grammar ----------------------------------------------------------------------------

    def parse(self) -> ColumnElement[bool]:
        condition = self._or()
        if self._peek().kind != "end":
            self._fail("expected 'and', 'or' or the end")
        return condition

    def _or(self) -> ColumnElement[bool]:
        terms = [self._and()]
        while self._keyword("or"):
            terms.append(self._and())
        return terms[0] if len(terms) == 1 else or_(*terms)

    def _and(self) -> ColumnElement[bool]:
        terms = [self._not()]
        while self._keyword("and"):
            terms.append(self._not())
        return terms[0] if len(terms) == 1 else and_(*terms)

    def _not(self) -> ColumnElement[bool]:
        if self._keyword("not"):
            return not_(self._not())
        if self._peek().text == "(":
            self._next()
            condition = self._or()
            self._expect(")")
            return condition
        return self._comparison()

    def _comparison(self) -> ColumnElement[bool]:
        name = self._next()
        if name.kind != "word":
            self._fail("expected a field", name)
        if name.text == "tags":
            if not self._keyword("has"):
                self._fail("expected 'has' after 'tags'")
            tag = self._value()
            return (
                select(TagRow.tag)
                .where(
                    TagRow.shop_id == S.shop_id,
                    TagRow.person_id == S.person_id,
                    TagRow.tag == tag.value,
                )
                .exists()
            )
        if name.text in WINDOWED and self._peek().text == "(":
            return self._number(self._window(name), name)
        field = FIELDS.get(name.text)
        if field is None:
            self._fail(f"unknown field; known: {', '.join(sorted([*FIELDS, 'tags']))}", name)
        if field.type == "bool":
            if self._peek().text in ("=", "!="):
                op, value = self._next().text, self._next()
                if value.text not in ("true", "false"):
                    self._fail("expected true or false", value)
                wanted = (value.text == "true") == (op == "=")
            else:
                wanted = True
            flag: ColumnElement[bool] = field.column.is_(true() if wanted else false())
            return flag
        if field.type == "number":
            return self._number(field.column, name)
        if field.type == "days_since":
            return self._days_since(field.column)
        return self._choice(field, name)

    # --- the parts of a comparison --------------------------------------------------------------

    def _number(self, column: Any, name: Token) -> ColumnElement[bool]:
        op = self._operator(COMPARISONS)
        value = self._next()
        if value.kind != "number":
            self._fail(f"'{name.text}' compares with a number", value)
        number = Decimal(value.text)
        comparisons: dict[str, ColumnElement[bool]] = {
            "=": column == number,
            "!=": column != number,
            "<": column < number,
            "<=": column <= number,
            ">": column > number,
            ">=": column >= number,
        }
        return comparisons[op]

    def _days_since(self, column: Any) -> ColumnElement[bool]:
        op = self._operator(("<", "<=", ">", ">="))
        value = self._next()
        if value.kind != "number" or "." in value.text:
            self._fail("expected a whole number of days", value)
        since = self._now - timedelta(days=min(int(value.text), MAX_WINDOW_DAYS * 10))
        # More days since the order means an earlier order.
        flipped: dict[str, ColumnElement[bool]] = {
            "<": column > since,
            "<=": column >= since,
            ">": column < since,
            ">=": column <= since,
        }
        return flipped[op]

    def _choice(self, field: Field, name: Token) -> ColumnElement[bool]:
        op = self._operator(("=", "!=", "in"))
        if op == "in":
            self._expect("(")
            values = [self._allowed(field, self._value())]
            while self._peek().text == ",":
                self._next()
                values.append(self._allowed(field, self._value()))
            self._expect(")")
            among: ColumnElement[bool] = field.column.in_(values)
            return among
        value = self._allowed(field, self._value())
        equal: ColumnElement[bool] = field.column == value
        return equal if op == "=" else not_(equal)

    def _window(self, name: Token) -> Any:
        what, kind = WINDOWED[name.text]
        self._expect("(")
        days = self._next()
        if days.kind != "days":
            self._fail("expected a window such as 90d", days)
        span = int(days.text[:-1])
        if not 1 <= span <= MAX_WINDOW_DAYS:
            self._fail(f"a window is 1d to {MAX_WINDOW_DAYS}d", days)
        qualifier = ""
        if self._peek().text == ",":
            self._next()
            token = self._value()
            allowed = CHANNELS if what == "events" else SOURCES
            if token.value not in allowed:
                self._fail(f"expected one of {', '.join(allowed)}", token)
            qualifier = token.value
        self._expect(")")
        window = Window(what, kind, span, qualifier)
        if window not in self.windows:
            self.windows[window] = self._aggregate(window).subquery(f"w{len(self.windows)}")
        column = self.windows[window].c.amount
        return func.coalesce(column, 0)

    def _aggregate(self, window: Window) -> Select:
        """Per person, the count or net sum of their orders or events in the window."""
        since = self._now - timedelta(days=window.days)
        A = PersonAnchorRow
        if window.what == "events":
            return (
                select(A.person_id, func.count().label("amount"))
                .select_from(EventRow)
                .join(
                    A,
                    (A.shop_id == EventRow.shop_id)
                    & (A.anchor_type == EventRow.anchor_type)
                    & (A.anchor_key == EventRow.anchor_key),
                )
                .where(
                    EventRow.shop_id == self._shop_id,
                    EventRow.at >= since,
                    EventRow.kind == window.kind,
                    *([EventRow.channel == window.qualifier] if window.qualifier else []),
                )
                .group_by(A.person_id)
            )
        if window.what == "orders":
            amount: Any = func.count()
        else:
            refunds = (
                select(RefundRow.order_id, func.sum(RefundRow.amount).label("refunded"))
                .where(RefundRow.shop_id == self._shop_id)
                .group_by(RefundRow.order_id)
                .subquery()
            )
            refunded = func.coalesce(refunds.c.refunded, 0)
            net = case((refunded > OrderRow.total, 0), else_=OrderRow.total - refunded)
            amount = func.sum(net)
        query = (
            select(A.person_id, amount.label("amount"))
            .select_from(OrderRow)
            .join(
                A,
                (A.shop_id == OrderRow.shop_id)
                & (A.anchor_type == OrderRow.anchor_type)
                & (A.anchor_key == OrderRow.anchor_key),
            )
            .where(
                OrderRow.shop_id == self._shop_id,
                OrderRow.placed_at >= since,
                OrderRow.cancelled.is_(False),
                *([OrderRow.source == window.qualifier] if window.qualifier else []),
            )
            .group_by(A.person_id)
        )
        if window.what == "spend":
            query = query.outerjoin(refunds, refunds.c.order_id == OrderRow.order_id)
        return query

    # --- tokens ---------------------------------------------------------------------------------

    def _peek(self) -> Token:
        return self._tokens[self._at]

    def _next(self) -> Token:
        token = self._tokens[self._at]
        if token.kind != "end":
            self._at += 1
        return token

    def _keyword(self, word: str) -> bool:
        token = self._peek()
        if token.kind == "word" and token.text.lower() == word:
            self._next()
            return True
        return False

    def _expect(self, text: str) -> None:
        token = self._next()
        if token.text != text:
            self._fail(f"expected '{text}'", token)

    def _operator(self, allowed: tuple[str, ...]) -> str:
        token = self._next()
        text = token.text.lower()
        if text not in allowed:
            self._fail(f"expected one of {' '.join(allowed)}", token)
        return text

    def _value(self) -> Token:
        token = self._next()
        if token.kind not in ("word", "string", "number"):
            self._fail("expected a value", token)
        return token

    def _allowed(self, field: Field, token: Token) -> str:
        if field.values and token.value not in field.values:
            self._fail(f"expected one of {', '.join(field.values)}", token)
        return token.value

    def _fail(self, expected: str, token: Token | None = None) -> NoReturn:
        token = token or self._peek()
        raise FilterError(token.position, token.text, expected)


def members(text: str, shop_id: str, now: datetime) -> Select:
    """The query of the person ids the filter selects in a shop, in person id order."""
    compiler = Compiler(text, shop_id, now)
    condition = compiler.parse()
    source: Any = S.__table__.outerjoin(
        G.__table__, (G.shop_id == S.shop_id) & (G.person_id == S.person_id)
    )
    for window in compiler.windows.values():
        source = source.outerjoin(window, window.c.person_id == S.person_id)
    return (
        select(S.person_id)
        .select_from(source)
        .where(S.shop_id == shop_id, condition)
        .order_by(S.person_id)
    )
