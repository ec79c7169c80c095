"""The allocator a process runs with: the choice, ``LD_PRELOAD``, and a real re-execution."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hapo.runtime.allocator import choose, find_tcmalloc, loaded_libraries, preload

TCMALLOC = "libtcmalloc_minimal.so.4"

library_names = st.from_regex(r"lib[a-z]{1,8}\.so(\.[0-9])?", fullmatch=True)


@given(st.lists(library_names, max_size=5), library_names)
def test_preload_puts_the_library_first_once_and_keeps_the_rest(
    existing: list[str], library: str
) -> None:
    result = preload(library, ":".join(existing)).split(":")
    assert result[0] == library
    assert result.count(library) == 1
    # The others, in their order, without the library.
    assert result[1:] == [name for name in existing if name != library]


def test_preload_reads_spaces_as_the_dynamic_linker_does() -> None:
    # ld.so splits LD_PRELOAD on spaces and colons alike.
    assert preload(TCMALLOC, "liba.so libb.so:") == f"{TCMALLOC}:liba.so:libb.so"
    assert preload(TCMALLOC, "") == TCMALLOC


def test_choose() -> None:
    assert choose("auto", TCMALLOC) == TCMALLOC
    assert choose("auto", None) is None  # runs on without it
    assert choose("tcmalloc", TCMALLOC) == TCMALLOC
    assert choose("system", TCMALLOC) is None
    with pytest.raises(ValueError, match=r"^runtime\.allocator: tcmalloc is not installed"):
        choose("tcmalloc", None)


def test_loaded_libraries_reads_the_mapped_files(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f10 r-xp 00000000 08:01 12 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f10-7f20 rw-p 00000000 00:00 0 \n"
        "7f20-7f30 r--p 00000000 08:01 13 /usr/lib/libtcmalloc_minimal.so.4.5.10\n"
        "7ffd-7ffe rw-p 00000000 00:00 0 [stack]\n"
    )
    assert loaded_libraries(maps) == {"libc.so.6", "libtcmalloc_minimal.so.4.5.10"}
    assert loaded_libraries(tmp_path / "absent") == set()


PROBE = """
import json, os, sys
from hapo.runtime.allocator import exec_with_allocator, loaded_libraries
exec_with_allocator(sys.argv[1])
print(json.dumps({"argv": sys.argv[1:], "ld_preload": os.environ.get("LD_PRELOAD", ""),
                  "tcmalloc": any("tcmalloc" in name for name in loaded_libraries())}))
"""


def run_probe(allocator: str, ld_preload: str = "") -> dict:
    env = {"PATH": "/usr/bin:/bin", "LD_PRELOAD": ld_preload}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, allocator, "--keep", "me"],
        capture_output=True, text=True, env=env, check=True, timeout=60,
    )  # fmt: skip
    (line,) = done.stdout.splitlines()  # printed after the exec only
    assert done.stderr == ""  # no warning: the library preloaded is found loaded
    return json.loads(line)


def test_a_process_re_executes_itself_with_tcmalloc_once() -> None:
    library = find_tcmalloc()
    assert library, "tcmalloc is not installed: run scripts/install-tcmalloc.sh (make setup)"
    probe = run_probe("auto", ld_preload="libm.so.6")
    # Its arguments and what LD_PRELOAD held survive the exec.
    assert probe == {
        "argv": ["auto", "--keep", "me"],
        "ld_preload": f"{library}:libm.so.6",
        "tcmalloc": True,
    }
    assert run_probe("system") == {"argv": ["system", "--keep", "me"], "ld_preload": "",
                                   "tcmalloc": False}  # fmt: skip
