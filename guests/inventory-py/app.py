"""Inventory, in Python: a port of `guests/inventory` (Rust) that behaves
the same, event for event.

It reserves stock for every order published to the `orders` fanout
exchange, and announces the result on the `inventory` topic exchange
(`inventory.reserved`, `inventory.low`, `inventory.rejected`; config
`inventory-exchange` renames it).

State (per handler, transactional per event):
- `stock.<item>`: units left, ASCII decimal; seeded from the handler config
  key of the same name the first time an item is seen.
- `order.<id>`: "reserved" or "rejected" once an order was handled, so the
  same order delivered twice reserves stock once.

Config (`wasi:config`, the `[handlers.inventory.config]` table):
`stock.<item>`, `low-stock-threshold`, `inventory-exchange`,
`announce-reservations`.

Everything the Rust guest lets out -- state keys and values, published
bodies, reject and retry reasons -- is byte for byte the same; the pieces
of serde_json and Rust formatting that takes are in `rustcompat`.
"""

from dataclasses import dataclass
from typing import Optional, Union

import wit_world
from componentize_py_types import Err
from wit_world.imports import atomics, logging, publisher
from wit_world.imports import wasi_config_store as config
from wit_world.imports import wasi_keyvalue_store as kv
from wit_world.imports.types import (
    ExchangeKind,
    HandleError_Reject,
    HandleError_Retry,
    Manifest,
    Output,
    Subscription,
)

from rustcompat import (
    JsonError,
    Number,
    debug_str,
    debug_variant,
    parse_i64,
    parse_struct,
    parse_value,
    to_json,
    trim,
)

# The deepest `[`/`{` nesting a payload may have (guests/shared/json.rs):
# the Rust guest refuses deeper payloads before parsing, with this reason.
MAX_DEPTH = 32

# How many tries a reservation gets when its compare-and-swap finds the
# stock changed under it. The host runs each call in its own transaction,
# so that should never happen; if it does, the bound keeps a livelocked
# call from spinning until its deadline.
CAS_TRIES = 3

LOG_CONTEXT = "inventory"


class Reject(Exception):
    """A permanent failure: the event is dead-lettered with this reason."""


class Retry(Exception):
    """A transient failure: the event is tried again after a backoff."""


# -- the order -------------------------------------------------------------------


@dataclass
class Order:
    id: Union[Number, str]  # as given, echoed in publishes
    key: str  # the id as text, for state keys
    item: str
    quantity: int


def check_depth(payload: bytes) -> None:
    """Refuse payloads nested deeper than MAX_DEPTH, without parsing them
    (a port of shared/json.rs: brackets inside strings do not count)."""
    depth, in_string, escaped = 0, False, False
    for b in payload:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:  # quote
                in_string = False
            continue
        if b == 0x22:
            in_string = True
        elif b in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > MAX_DEPTH:
                raise Reject(f"payload nests deeper than {MAX_DEPTH} levels")
        elif b in (0x5D, 0x7D) and depth:  # ] }
            depth -= 1


def parse_order(payload: bytes) -> Order:
    check_depth(payload)
    # Only an object can be an order (serde would also take an array,
    # positionally). Rust's ASCII whitespace includes form feed.
    if payload.lstrip(b" \t\n\x0c\r")[:1] != b"{":
        try:
            parse_value(payload)
        except JsonError as e:
            raise Reject(f"payload is not JSON: {e}") from None
        raise Reject("payload is not a JSON object")
    try:
        raw = parse_struct(payload, ("id", "item", "quantity"))
    except JsonError as e:
        raise Reject(f"payload is not JSON: {e}") from None

    # A null field counts as missing, as an `Option` does in Rust.
    order_id = raw.get("id")
    if order_id is None:
        raise Reject("missing field `id`")
    if isinstance(order_id, Number):
        key = str(order_id)
    elif isinstance(order_id, str) and order_id:
        key = order_id
    else:
        raise Reject("`id` must be a number or a non-empty string")

    item = raw.get("item")
    if item is None:
        raise Reject("missing field `item`")
    if not isinstance(item, str) or not item:
        raise Reject("`item` must be a non-empty string")

    quantity = raw.get("quantity")
    if quantity is None:
        raise Reject("missing field `quantity`")
    quantity = quantity.as_i64() if isinstance(quantity, Number) else None
    if quantity is None:
        raise Reject("`quantity` must be an integer")
    if quantity <= 0:
        raise Reject(f"`quantity` must be positive, got {quantity}")
    return Order(order_id, key, item, quantity)


# -- settings --------------------------------------------------------------------


@dataclass
class Settings:
    # Where announcements go (`inventory-exchange`, default `inventory`).
    exchange: str
    # Whether every reservation is announced (`inventory.reserved`);
    # `announce-reservations = "false"` keeps only the exceptions.
    announce_reservations: bool
    # `low-stock-threshold`: below it, `inventory.low` is published.
    low_stock_threshold: Optional[int]


_settings: Optional[Settings] = None


def settings() -> Settings:
    """The handler config every event reads, read once per instance: it is
    fixed for an instance's life (a new version or config means new
    instances), and each `wasi:config` call is a trip into the host.

    Read on first use, never at import: componentize-py runs the module's
    top level at build time, where there is no host config to read."""
    global _settings
    if _settings is None:

        def get(key: str) -> Optional[str]:
            try:
                return config.get(key)
            except Err:
                return None

        exchange = get("inventory-exchange")
        announce = get("announce-reservations")
        raw_threshold = get("low-stock-threshold")
        threshold = None
        if raw_threshold is not None:
            # A malformed threshold is logged and ignored: it must not hold
            # up orders.
            threshold = parse_i64(trim(raw_threshold))
            if threshold is None:
                logging.log(
                    logging.Level.WARN,
                    LOG_CONTEXT,
                    "config `low-stock-threshold` is not an integer: " + debug_str(raw_threshold),
                )
        _settings = Settings(
            exchange=exchange if exchange is not None else "inventory",
            announce_reservations=announce is None or trim(announce) != "false",
            low_stock_threshold=threshold,
        )
    return _settings


# -- state and publishing ----------------------------------------------------------


def store_error(error: kv.Error) -> Retry:
    # A state failure is the host's problem, and transient: try again.
    return Retry("state error: " + debug_variant("Error", error))


def send(routing_key: str, body: str) -> None:
    props = publisher.Properties(
        content_type="application/json", message_id=None, correlation_id=None, headers=[]
    )
    try:
        publisher.publish(settings().exchange, routing_key, body.encode(), props)
    except Err as e:
        raise Retry("publish refused: " + debug_variant("PublishError", e.value)) from None


def current_stock(cas: atomics.Cas, key: str) -> Optional[int]:
    """The stock a CAS handle saw for `key`, seeded from the config key of
    the same name when state has none yet. None is an item neither knows."""
    try:
        stored = cas.current()
    except Err as e:
        raise store_error(e.value) from None
    if stored is not None:
        try:
            stock = parse_i64(trim(stored.decode("utf-8")))
        except UnicodeDecodeError:
            stock = None
        if stock is None:
            raise Retry(f"state `{key}` is not an integer")
        return stock
    try:
        seed = config.get(key)
    except Err as e:
        raise Retry("config error: " + debug_variant("Error", e.value)) from None
    if seed is None:
        return None
    stock = parse_i64(trim(seed))
    if stock is None:
        raise Reject(f"config `{key}` is not an integer: {debug_str(seed)}")
    return stock


@dataclass
class Reserved:
    remaining: int


@dataclass
class Rejected:
    reason: str
    available: int


def reserve(bucket: kv.Bucket, item: str, quantity: int) -> Union[Reserved, Rejected]:
    """Take `quantity` units of `item` off the stock, through a CAS so the
    decrement applies only to the value it was computed from."""
    key = f"stock.{item}"
    try:
        cas = atomics.Cas.new(bucket, key)
    except Err as e:
        raise store_error(e.value) from None
    # A handle `swap` did not take is dropped when `cas` is rebound or
    # `reserve` returns (CPython frees it at once): nothing outlives the event.
    tries = 1
    while True:
        available = current_stock(cas, key)
        if available is None:
            return Rejected("unknown item", 0)
        if available < quantity:
            return Rejected("insufficient stock", available)
        remaining = available - quantity
        try:
            # `swap` takes the handle, whatever it returns.
            atomics.swap(cas, str(remaining).encode())
            return Reserved(remaining)
        except Err as e:
            failure = e.value
        if isinstance(failure, atomics.CasError_StoreError):
            raise store_error(failure.value)
        if tries >= CAS_TRIES:
            raise Retry(f"`{key}` kept changing during the reservation")
        # The failed swap hands back a handle on the new value: decide
        # again from that.
        tries += 1
        cas = failure.value


# -- the handler ---------------------------------------------------------------------


def handle_order(payload: bytes) -> None:
    order = parse_order(payload)
    try:
        bucket = kv.open("")
    except Err as e:
        raise store_error(e.value) from None
    with bucket:
        seen_key = f"order.{order.key}"
        try:
            seen = bucket.exists(seen_key)
        except Err as e:
            raise store_error(e.value) from None
        if seen:
            logging.log(logging.Level.DEBUG, LOG_CONTEXT, f"order {order.key} already handled")
            return

        outcome = reserve(bucket, order.item, order.quantity)
        try:
            bucket.set(seen_key, b"reserved" if isinstance(outcome, Reserved) else b"rejected")
        except Err as e:
            raise store_error(e.value) from None

        # Bodies are built in the Rust guest's key order: a struct's field
        # order for `inventory.reserved`, sorted keys for the other two
        # (serde_json's `json!` maps are BTreeMaps).
        if isinstance(outcome, Reserved):
            if settings().announce_reservations:
                send(
                    "inventory.reserved",
                    to_json(
                        {
                            "order_id": order.id,
                            "item": order.item,
                            "quantity": order.quantity,
                            "remaining": outcome.remaining,
                        }
                    ),
                )
            logging.log(
                logging.Level.DEBUG,
                LOG_CONTEXT,
                f"reserved {order.quantity} x {order.item} for order {order.key}, "
                f"{outcome.remaining} left",
            )
            threshold = settings().low_stock_threshold
            if threshold is not None and outcome.remaining < threshold:
                send(
                    "inventory.low",
                    to_json(
                        {"item": order.item, "remaining": outcome.remaining, "threshold": threshold}
                    ),
                )
        else:
            send(
                "inventory.rejected",
                to_json(
                    {
                        "available": outcome.available,
                        "item": order.item,
                        "order_id": order.id,
                        "quantity": order.quantity,
                        "reason": outcome.reason,
                    }
                ),
            )


class WitWorld(wit_world.WitWorld):
    def manifest(self) -> Manifest:
        return Manifest(
            name="inventory",
            version="1.0.0",
            subscriptions=[
                Subscription(exchange="orders", kind=ExchangeKind.FANOUT, binding_keys=[])
            ],
            # Where reservations and low-stock notices go (a config that
            # renames it, `inventory-exchange`, must name the new one in
            # `publishes_to`).
            publishes=[Output(exchange="inventory", kind=ExchangeKind.TOPIC)],
            max_attempts=None,
        )

    def handle(self, event) -> None:
        try:
            handle_order(event.payload)
        except Reject as e:
            raise Err(HandleError_Reject(str(e))) from None
        except Retry as e:
            raise Err(HandleError_Retry(str(e))) from None
