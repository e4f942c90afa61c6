"""Byte-level mutations shared by the fuzz tests of binary inputs (.weights, .caffemodel, prototxt bytes)."""
from __future__ import annotations


def mutate_bytes(data: bytes, ops: list[tuple[str, float, bytes]]) -> bytes:
    """Apply (op, where in [0, 1], blob) edits in order: truncate, insert, delete, overwrite, duplicate."""
    out = bytearray(data)
    for op, where, blob in ops:
        pos = int(where * len(out))
        if op == "truncate":
            del out[pos:]
        elif op == "insert":
            out[pos:pos] = blob
        elif op == "delete":
            del out[pos:pos + len(blob)]
        elif op == "overwrite":
            out[pos:pos + len(blob)] = blob
        elif op == "duplicate":
            out[pos:pos] = out[pos:pos + 8 * len(blob)]
        else:
            raise ValueError(f"unknown mutation {op!r}")
    return bytes(out)
