"""parity-tap: records every message it receives, byte for byte, in its
state, so parity.sh can compare what two inventory builds published
exactly (replay's own output shows payloads re-parsed, which hides key
order and number formatting).

State: `seq` (a counter) and `msg.<nnnnn>` = one JSON line of the
envelope (exchange, routing key, properties, headers), a newline, then the
raw payload.
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import atomics
from wit_world.imports import wasi_keyvalue_store as kv
from wit_world.imports.types import ExchangeKind, HandleError_Retry, Manifest, Subscription


def _header(value):
    # HeaderValue_Text(value=...) -> ["Text", value]; bytes as hex.
    v = value.value
    return [type(value).__name__.split("_", 1)[-1], v.hex() if isinstance(v, bytes) else v]


class WitWorld(wit_world.WitWorld):
    def manifest(self) -> Manifest:
        return Manifest(
            name="parity-tap",
            version="1",
            subscriptions=[
                Subscription(exchange="inventory", kind=ExchangeKind.TOPIC, binding_keys=["#"])
            ],
            publishes=[],
            max_attempts=None,
        )

    def handle(self, event) -> None:
        envelope = {
            "exchange": event.exchange,
            "routing_key": event.routing_key,
            "message_id": event.message_id,
            "correlation_id": event.correlation_id,
            "content_type": event.content_type,
            "headers": [[name, _header(value)] for name, value in event.headers],
        }
        try:
            with kv.open("") as bucket:
                n = atomics.increment(bucket, "seq", 1)
                record = json.dumps(envelope, sort_keys=True).encode() + b"\n" + event.payload
                bucket.set(f"msg.{n:05d}", record)
        except Err as e:
            raise Err(HandleError_Retry(f"tap: {e.value!r}")) from None
