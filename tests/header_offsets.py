"""Layouts parsed from a darknet.h, checked against gcc compiling the same header."""
from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path
from typing import Any, Iterable


def offsets_by_gcc_and_parser(header: Any, structs: Iterable[str], include: Path,
                              work: Path) -> tuple[list[str], list[int], list[int]]:
    """(member names, parser's offsets and sizes, gcc's) for every member of `structs`.

    Why gcc: the ctypes layouts are derived by d2c's own header parser, so the only independent
    witness is the compiler's offsetof/sizeof on the very header the library was built from.
    """
    names, expected = [], []
    body = ['#include <stdio.h>', '#include <stddef.h>', '#include "darknet.h"', "int main(void){"]
    for struct_name in structs:
        cls = header.struct(struct_name)
        body.append(f'printf("%zu\\n", sizeof({struct_name}));')
        names.append(f"sizeof({struct_name})")
        expected.append(ctypes.sizeof(cls))
        for field, _ in cls._fields_:
            body.append(f'printf("%zu\\n", offsetof({struct_name}, {field}));')
            names.append(f"{struct_name}.{field}")
            expected.append(getattr(cls, field).offset)
    body.append("return 0;}")
    (work / "offsets.c").write_text("\n".join(body))
    subprocess.run(["gcc", f"-I{include}", "offsets.c", "-o", "offsets"], cwd=work, check=True, capture_output=True)
    out = subprocess.run([str(work / "offsets")], check=True, capture_output=True, text=True).stdout
    return names, expected, [int(v) for v in out.split()]
