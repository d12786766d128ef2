"""{{name}}: an event-host handler. The host calls `manifest` once when the
file is loaded (what to consume, what it may publish to) and `handle` once
per event. `wit/handler.wit` is the whole contract; `./build.sh` writes the
Python bindings to build/bindings for editors.
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import atomics, logging
from wit_world.imports import wasi_keyvalue_store as kv
from wit_world.imports.types import (
    ExchangeKind,
    HandleError_Reject,
    HandleError_Retry,
    Manifest,
    Subscription,
)


class WitWorld(wit_world.WitWorld):
    def manifest(self) -> Manifest:
        return Manifest(
            name="{{name}}",
            version="0.1.0",
            subscriptions=[
                Subscription(
                    exchange="{{exchange}}",
                    kind=ExchangeKind.{{kind_python}},
                    binding_keys=[{{binding_keys_python}}],
                )
            ],
            # Exchanges `publisher.publish` may send to (each declared by
            # the host).
            publishes=[],
            # None: the host config's `max_attempts` (default 5).
            max_attempts=None,
        )

    def handle(self, event) -> None:
        # A body that is not JSON never will be: a reject dead-letters it at
        # once, with this reason. A retry is for what may pass later.
        try:
            body = json.loads(bytes(event.payload))
        except ValueError as e:
            raise Err(HandleError_Reject(f"payload is not JSON: {e}")) from None
        # State is per handler and transactional per event: this write
        # commits with the ack, and only if `handle` returns normally. The
        # bucket is the handler's own, named as Spin and wasmCloud name
        # theirs ("" works too).
        try:
            bucket = kv.open("default")
            seen = atomics.increment(bucket, f"count.{event.routing_key}", 1)
        except Err as e:
            raise Err(HandleError_Retry(f"state: {e.value}")) from None
        logging.log(
            logging.Level.INFO,
            "{{name}}",
            f"event {seen} with routing key {event.routing_key!r}: {json.dumps(body)}",
        )
