"""Read what an offline wandb run wrote: the records of its `run-<id>.wandb` file, parsed with wandb's own protobuf.

wandb 0.31 ships no Python reader for these files (the old `wandb.sdk.internal.datastore` is gone; `wandb sync`
uploads them). The format is wandb's: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB log blocks of
32 KiB, each record a 7-byte header (CRC-32C, length, type: FULL / FIRST / MIDDLE / LAST) and its bytes; the bytes
of a whole record are one `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)


def wandb_records(path: Path) -> Iterator[Any]:
    """Every record of one .wandb file, in order (a wandb_internal_pb2.Record each)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == HEADER, f"{path}: not a wandb transaction log (header {data[:7]!r})"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # the writer pads a block's tail that cannot hold a record header
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # padding or a file cut by a kill
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        yield record
        pending = b""


def wandb_history(path: Path) -> list[dict[str, Any]]:
    """The history rows (what `run.log` sent), each {key: value} with `_step` as an int."""
    import json

    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.append(row)
    return rows


def wait_for_exit_record(folder: Path, n_files: int, timeout: float = 60.0) -> list[Path]:
    """The run files under `folder`, once `n_files` of them end with an exit record.

    `wandb.finish()` can return while wandb-core is still writing the offline file's last records; a process that
    exits waits for it, an in-process reader polls."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        files = sorted(folder.glob("offline-run-*/run-*.wandb"))
        done = [f for f in files if any(r.WhichOneof("record_type") == "exit" for r in wandb_records(f))]
        if len(done) >= n_files or time.monotonic() > deadline:
            return files
        time.sleep(0.2)


def wandb_run_ids(path: Path) -> set[str]:
    return {r.run.run_id for r in wandb_records(path) if r.WhichOneof("record_type") == "run"}
