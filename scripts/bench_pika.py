#!/usr/bin/env python3
"""Drain QUEUE with pika, the way most users write a consumer by hand:
parse each order as JSON, ack (multiple) every ACK_EVERY messages.

usage: scripts/bench_pika.py QUEUE COUNT PREFETCH ACK_EVERY
Prints the drain rate as: pika_events_per_sec=<float>
"""
import json
import os
import sys
import time

import pika

queue, count, prefetch, ack_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
url = os.environ.get("EVENT_HOST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.basic_qos(prefetch_count=prefetch)
state = {"n": 0, "start": None}


def on_message(ch, method, properties, body):
    if state["start"] is None:
        state["start"] = time.perf_counter()
    order = json.loads(body)
    assert order["quantity"] > 0
    state["n"] += 1
    if state["n"] % ack_every == 0 or state["n"] == count:
        ch.basic_ack(method.delivery_tag, multiple=True)
    if state["n"] == count:
        ch.stop_consuming()


channel.basic_consume(queue=queue, on_message_callback=on_message)
channel.start_consuming()
elapsed = time.perf_counter() - state["start"]
print(f"pika_events_per_sec={count / elapsed:.1f}")
connection.close()
