#!/usr/bin/env python3
"""Publish one message the way a plain client does: a body and no properties.

usage: scripts/publish.py EXCHANGE ROUTING_KEY BODY
The broker URL comes from EVENT_HOST_AMQP_URL (default: local guest).
"""
import os
import sys

import pika

url = os.environ.get("EVENT_HOST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
exchange, routing_key, body = sys.argv[1:4]
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.basic_publish(exchange=exchange, routing_key=routing_key, body=body.encode())
connection.close()
print(f"published to {exchange!r} ({routing_key!r}): {body}")
