"""A realistic demo shop, generated from a seed: shoppers buying online, in store and on
marketplaces over two years (one-off buyers, repeat buyers, loyal regulars who drift away),
refunds and returns, engagement across channels, consents and unsubscribes, customer records
from a CRM, a few duplicate persons for the Duplicates list, and this week's marketing emails.

Pure data: the same seed, customer count and day give exactly the same shop. Times are fixed
relative to the shop's day (`today`), so the same shop loaded again is the same facts."""

import random
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

HISTORY_DAYS = 730
FIRST_NAMES = (
    "Ada", "Alba", "Amir", "Ana", "Anders", "Aoife", "Ben", "Bea", "Carla", "Chen", "Chloe",
    "Dario", "Demi", "Eli", "Elena", "Emil", "Eva", "Farah", "Felix", "Freya", "Gio", "Greta",
    "Hana", "Hugo", "Ines", "Ivan", "Jade", "Jonas", "Kai", "Keira", "Lars", "Lea", "Leo",
    "Lina", "Luca", "Maja", "Malik", "Mara", "Mateo", "Mia", "Nico", "Nina", "Noah", "Olga",
    "Omar", "Paula", "Pedro", "Priya", "Rafa", "Rosa", "Sami", "Sara", "Sven", "Tara", "Theo",
    "Una", "Vera", "Wen", "Yara", "Yusuf", "Zoe",
)  # fmt: skip
LAST_NAMES = (
    "Abbott", "Berg", "Castro", "Dahl", "Eriksen", "Fischer", "Garcia", "Hale", "Ivanova",
    "Jensen", "Keller", "Lopez", "Moreau", "Nakamura", "Okafor", "Petrov", "Quinn", "Rossi",
    "Schmidt", "Tanaka", "Ueda", "Vidal", "Weber", "Xu", "Young", "Zeller",
)  # fmt: skip
DOMAINS = ("mail.example", "post.example", "inbox.example", "webmail.example")
STORES = ("Store: Amsterdam", "Store: Berlin", "Store: Lisbon")
MARKETPLACES = ("amazon", "ebay")
# (product id, title, category, unit price)
CATALOGUE = (
    ("p-espresso", "Espresso beans 1 kg", "coffee", "24.90"),
    ("p-filter", "Filter roast 500 g", "coffee", "13.50"),
    ("p-decaf", "Decaf 250 g", "coffee", "8.90"),
    ("p-capsules", "Capsules x50", "coffee", "17.00"),
    ("p-green-tea", "Sencha 100 g", "tea", "9.80"),
    ("p-chai", "Masala chai 200 g", "tea", "11.40"),
    ("p-grinder", "Burr grinder", "equipment", "139.00"),
    ("p-kettle", "Gooseneck kettle", "equipment", "59.00"),
    ("p-dripper", "Ceramic dripper", "equipment", "27.00"),
    ("p-filters", "Paper filters x100", "supplies", "6.50"),
    ("p-descaler", "Descaler", "supplies", "9.90"),
    ("p-mug", "Stoneware mug", "homeware", "16.00"),
    ("p-tin", "Storage tin", "homeware", "14.00"),
    ("p-gift", "Gift card", "gifts", "50.00"),
)  # fmt: skip
# Products people buy again and again.
REFILLS = ("p-espresso", "p-filter", "p-capsules", "p-filters", "p-green-tea")
CONSENT_TEXT = {
    "email": "Yes, send me news and offers by email. I can unsubscribe at any time.",
    "sms": "Text me offers and order updates. Reply STOP to opt out.",
    "whatsapp": "Message me on WhatsApp about offers and my orders.",
    "push": "Allow notifications from the app.",
}


@dataclass(frozen=True)
class LineItem:
    product_id: str
    title: str
    category: str
    quantity: int
    price: str


@dataclass(frozen=True)
class Order:
    order_id: str
    source: str  # online, pos, marketplace
    location: str
    placed_at: datetime
    items: tuple[LineItem, ...]
    total: str
    identifiers: tuple[tuple[str, str], ...]
    cancelled: bool = False


@dataclass(frozen=True)
class Refund:
    refund_id: str
    order_id: str
    amount: str
    refunded_at: datetime
    is_return: bool


@dataclass(frozen=True)
class Event:
    event_id: str
    kind: str  # visit, open, click, reply, dismiss
    channel: str  # "" for a visit
    at: datetime
    identifiers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Consent:
    channel: str
    granted: bool
    source: str
    at: datetime


@dataclass
class Shopper:
    """One customer of the shop (one person, once the mesh has resolved their identifiers)."""

    index: int
    first_name: str
    last_name: str
    email: str = ""
    phone: str = ""
    orders: list[Order] = field(default_factory=list)
    refunds: list[Refund] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    consents: list[Consent] = field(default_factory=list)
    unsubscribed_at: datetime | None = None
    emails_this_week: int = 0
    duplicate_of: int | None = None
    """For a duplicate person: the index of the shopper they duplicate."""

    @property
    def key(self) -> tuple[str, str]:
        """The identifier the shopper is looked up by: the first one their records carry."""
        if self.orders:
            return self.orders[0].identifiers[0]
        return self.events[0].identifiers[0]

    @property
    def record(self) -> dict[str, str] | None:
        """Their CRM record (Custobar format), when they gave an email or a phone."""
        if self.duplicate_of is not None or not (self.email or self.phone):
            return None
        record = {"first_name": self.first_name, "last_name": self.last_name}
        if self.email:
            record["email"] = self.email
        if self.phone:
            record["phone_number"] = self.phone
        return record


@dataclass
class DemoShop:
    """Everything the demo loads, in the order it loads it."""

    today: date
    shoppers: list[Shopper]

    @property
    def duplicates(self) -> list[Shopper]:
        return [s for s in self.shoppers if s.duplicate_of is not None]


def _money(amount: Decimal) -> str:
    return f"{amount.quantize(Decimal('0.01'))}"


class _Generator:
    def __init__(self, seed: int, today: date) -> None:
        self.rng = random.Random(seed)  # noqa: S311  (made-up data, reproducible by seed)
        self.now = datetime.combine(today, time(0), tzinfo=UTC)  # the shop's day begins
        self.orders = 0

    def instant(self, days_ago: float) -> datetime:
        """A time of day between 08:00 and 22:00, `days_ago` whole days before today."""
        day = self.now - timedelta(days=max(int(days_ago), 1))
        return day + timedelta(minutes=self.rng.randrange(8 * 60, 22 * 60))

    def items(self, regular: bool) -> tuple[LineItem, ...]:
        chosen = []
        if regular:
            refill = self.rng.choice(REFILLS)
            chosen.append(next(p for p in CATALOGUE if p[0] == refill))
        for _ in range(self.rng.choice((1, 1, 1, 2, 2, 3)) - len(chosen)):
            chosen.append(self.rng.choice(CATALOGUE))
        return tuple(
            LineItem(pid, title, category, self.rng.choice((1, 1, 1, 2)), price)
            for pid, title, category, price in chosen
        )

    def order(
        self, shopper: Shopper, source: str, at: datetime, ids: tuple[tuple[str, str], ...],
        regular: bool,
    ) -> Order:  # fmt: skip
        self.orders += 1
        items = self.items(regular)
        total = sum((Decimal(i.price) * i.quantity for i in items), Decimal(0))
        if source == "online":
            order_id, location = str(5_000_000_000_000 + self.orders), ""
        elif source == "pos":
            order_id, location = f"POS-{self.orders:07d}", self.rng.choice(STORES)
        else:
            market = "ebay" if ids[0][0] == "ebay_user_id" else "amazon"
            order_id, location = f"{market.upper()}-{self.orders:07d}", market
        # The first customer's orders stand: the demo finds the day a shop was loaded by them.
        cancelled = self.rng.random() < 0.01 and shopper.index != 0
        order = Order(order_id, source, location, at, items, _money(total), ids, cancelled)
        if not cancelled and self.rng.random() < 0.07:
            back = at + timedelta(days=self.rng.randint(2, 20))
            if back < self.now:
                whole = self.rng.random() < 0.5
                amount = total if whole else total * Decimal(self.rng.choice(("0.2", "0.5")))
                shopper.refunds.append(
                    Refund(f"R-{order_id}", order_id, _money(amount), back, whole)
                )
        return order

    def shopper(self, index: int) -> Shopper:
        rng = self.rng
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        shopper = Shopper(index, first, last)
        home = rng.choices(("online", "pos", "marketplace"), (65, 20, 15))[0]
        if index == 0:
            home = "online"  # the shop's first customer places the first order
        buys = rng.choices(("browser", "once", "repeat", "regular"), (12, 38, 35, 15))[0]
        if index == 0:
            buys = "repeat"
        local = f"{first}.{last}{index}".lower()
        if home == "online" or (home == "pos" and rng.random() < 0.7) or buys == "browser":
            shopper.email = f"{local}@{rng.choice(DOMAINS)}"
        if home == "marketplace":
            shopper.phone = f"+447912{index:06d}" if rng.random() < 0.4 else ""
        elif not shopper.email or rng.random() < 0.5:
            shopper.phone = f"+447912{index:06d}"
        market_id = (
            ("ebay_user_id", f"{first.lower()}_{index}")
            if rng.random() < 0.3
            else ("amazon_buyer_id", f"A{index:08d}X")
        )
        # What each channel's records carry: its own id, and every contact the shopper gave, so
        # that whatever they buy through meets their other records.
        contacts = tuple(
            (t, v) for t, v in (("email", shopper.email), ("phone", shopper.phone)) if v
        )
        ids = {
            "online": (("shopify_customer_id", str(7_000_000_000_000 + index)), *contacts),
            "pos": (("pos_customer_id", f"POS{index:06d}"), *contacts),
            "marketplace": (market_id, *((("phone", shopper.phone),) if shopper.phone else ())),
        }
        if buys != "browser":
            self._orders(shopper, home, buys, ids)
        self._engagement(shopper, buys)
        self._consents(shopper)
        return shopper

    def _orders(
        self, shopper: Shopper, home: str, buys: str, ids: dict[str, tuple[tuple[str, str], ...]]
    ) -> None:
        rng = self.rng
        if buys == "once":  # more of them lately: the shop grows
            days = [1 + (HISTORY_DAYS - 1) * rng.random() ** 1.6]
        else:
            count = rng.randint(2, 4) if buys == "repeat" else rng.randint(5, 10)
            gap = rng.uniform(40, 160) if buys == "repeat" else rng.uniform(20, 50)
            # Most are still buying; a quarter drifted away a while ago (at risk, churned).
            days = [rng.uniform(1, gap) if rng.random() < 0.75 else rng.uniform(30, 400)]
            while len(days) < count and days[-1] + 7 + gap / 2 < HISTORY_DAYS:
                days.append(min(days[-1] + 7 + rng.expovariate(1 / gap), HISTORY_DAYS))
        for n, day in enumerate(sorted(days, reverse=True)):  # oldest first
            source = home
            if n and home in ("online", "pos") and shopper.email and rng.random() < 0.15:
                source = "pos" if home == "online" else "online"
            if n and home != "marketplace" and shopper.phone and rng.random() < 0.08:
                source = "marketplace"
            shopper.orders.append(
                self.order(shopper, source, self.instant(day), ids[source], buys == "regular")
            )

    def _engagement(self, shopper: Shopper, buys: str) -> None:
        rng = self.rng
        if not (shopper.email or shopper.phone):
            return
        active = buys in ("browser", "regular") or rng.random() < 0.4
        window = 30 if active and rng.random() < 0.5 else 300
        count = rng.choice((1, 1, 2, 3)) if active else rng.choice((0, 0, 0, 1))
        if buys == "browser":
            count = max(count, 1)  # a browser is known from a visit
        by = ("email", shopper.email) if shopper.email else ("phone", shopper.phone)
        for n in range(count):
            kind, channel = rng.choice(
                (("visit", ""), ("open", "email"), ("open", "email"), ("click", "email"))
                if shopper.email
                else (("visit", ""), ("reply", "sms"), ("open", "whatsapp"))
            )
            at = self.instant(rng.uniform(1, window))
            shopper.events.append(Event(f"EV-{shopper.index}-{n}", kind, channel, at, (by,)))
        shopper.events.sort(key=lambda e: e.at)
        if buys == "browser":  # the visit that made them known comes first
            first = shopper.events[0]
            shopper.events[0] = Event(first.event_id, "visit", "", first.at, first.identifiers)

    def _consents(self, shopper: Shopper) -> None:
        rng = self.rng
        known_at = min([o.placed_at for o in shopper.orders] + [e.at for e in shopper.events])
        wants = []
        if shopper.email and rng.random() < 0.6:
            wants.append("email")
        if shopper.phone and rng.random() < 0.35:
            wants.append("sms")
        if shopper.phone and rng.random() < 0.15:
            wants.append("whatsapp")
        if shopper.email and rng.random() < 0.2:
            wants.append("push")
        source = "checkout" if shopper.orders else "popup"
        for channel in wants:
            shopper.consents.append(Consent(channel, True, source, known_at))
        if shopper.email and rng.random() < 0.04:
            shopper.unsubscribed_at = known_at + (self.now - known_at) / 2
        elif "email" in wants:
            # This week's campaigns: most got a few emails, some far too many.
            shopper.emails_this_week = rng.choices(
                (0, 1, 2, 3, 4, 5, 6, 7, 8), (20, 14, 14, 12, 8, 6, 5, 12, 9)
            )[0]

    def duplicate(self, index: int, of: Shopper, kind: int) -> Shopper:
        """A second person for a shopper, and a merge candidate rather than a merge: another
        Shopify account with the same email (two Shopify ids), or a guest checkout with
        another email and the shopper's phone (a link by phone alone)."""
        twin = Shopper(index, of.first_name, of.last_name, duplicate_of=of.index)
        if kind == 0:
            account = ("shopify_customer_id", str(7_100_000_000_000 + index))
            ids: tuple[tuple[str, str], ...] = (account, ("email", of.email))
        else:
            twin.email = f"{of.first_name}.{of.last_name}.{index}@{DOMAINS[0]}".lower()
            ids = (("email", twin.email), ("phone", of.phone))
        at = self.instant(self.rng.uniform(2, 60))
        twin.orders.append(self.order(twin, "online", at, ids, regular=False))
        return twin


def generate(seed: int, customers: int, today: date) -> DemoShop:
    """The demo shop: `customers` persons, of which a few (one in 250, at least 2) duplicate
    another shopper and wait in the Duplicates list."""
    if customers < 10:
        raise ValueError("a demo shop has at least 10 customers")
    generator = _Generator(seed, today)
    duplicates = max(2, customers // 250)
    shoppers = [generator.shopper(i) for i in range(customers - duplicates)]
    online = [s for s in shoppers if s.email and s.orders and s.orders[0].source == "online"]
    with_phone = [s for s in online if s.phone]
    # Half of them share a phone, half an email; never two of the same shopper.
    sharing_phone = generator.rng.sample(with_phone, min(duplicates // 2, len(with_phone)))
    rest = [s for s in online if s not in sharing_phone]
    sharing_email = generator.rng.sample(rest, duplicates - len(sharing_phone))
    twins = [
        generator.duplicate(len(shoppers) + n, of, kind)
        for n, (of, kind) in enumerate(
            [(s, 1) for s in sharing_phone] + [(s, 0) for s in sharing_email]
        )
    ]
    return DemoShop(today, shoppers + twins)
