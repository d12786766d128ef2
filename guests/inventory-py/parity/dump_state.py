"""Prints a replay state folder (embedded SQLite) as sorted text lines, for
diffing: every key and value per handler, the message ids each handler
recorded as processed (without their timestamps), and the outbox rows
left (replay clears what it routes, so none are expected).

    python3 dump_state.py STATE_DIR
"""

import json
import sqlite3
import sys
from pathlib import Path


def text(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    return json.dumps(value, ensure_ascii=False)


def main(state_dir):
    files = sorted(p for p in Path(state_dir).iterdir() if p.suffix in (".db", ".sqlite", ".sqlite3"))
    if len(files) != 1:
        sys.exit(f"dump_state.py: expected one database in {state_dir}, found {[p.name for p in files]}")
    db = sqlite3.connect(files[0])
    for ns, key, value in db.execute("SELECT ns, key, value FROM kv ORDER BY ns, key"):
        print("kv", ns, text(key), text(value))
    for ns, message_id in db.execute("SELECT ns, message_id FROM processed ORDER BY ns, message_id"):
        print("processed", ns, text(message_id))
    (left,) = db.execute("SELECT count(*) FROM outbox_batches").fetchone()
    print("outbox rows left", left)


if __name__ == "__main__":
    main(sys.argv[1])
