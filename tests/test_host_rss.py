"""The host RSS reader gives psutil's figure, fresh at every read, in this process and in a fork."""

from __future__ import annotations

import os
import sys

import psutil
import pytest

from profiler.tracking.host_rss import HostRss, rss_source

MiB = 1 << 20


def _close(a: int, b: int) -> bool:
    return abs(a - b) <= 2 * MiB  # (the interpreter allocates between the two reads)


def test_reads_what_psutil_reads_and_follows_an_allocation() -> None:
    rss = HostRss()
    try:
        assert rss.source == rss_source()
        before = rss.read()
        assert _close(before, psutil.Process().memory_info().rss)
        buf = bytearray(64 * MiB)  # zero-filled: every page touched
        grown = rss.read()
        assert grown - before >= 60 * MiB
        assert _close(grown, psutil.Process().memory_info().rss)
        del buf
        assert rss.read() < grown - 32 * MiB
    finally:
        rss.close()


def test_after_close_it_still_reads() -> None:
    rss = HostRss()
    rss.close()
    rss.close()
    assert _close(rss.read(), psutil.Process().memory_info().rss)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_reads_its_own_figure() -> None:
    rss = HostRss()
    try:
        parent = rss.read()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child grows by 128 MiB; the parent does not
            try:
                first = rss.read()
                buf = bytearray(128 * MiB)
                ok = rss.read() - first >= 120 * MiB and _close(rss.read(), psutil.Process().memory_info().rss)
                os.write(w, b"1" if ok and buf else b"0")
            finally:
                os._exit(0)
        os.close(w)
        answer = os.read(r, 1)
        os.close(r)
        os.waitpid(pid, 0)
        assert answer == b"1"
        assert _close(rss.read(), parent)
    finally:
        rss.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux reads /proc/self/statm")
def test_on_linux_it_reads_the_proc_file() -> None:
    rss = HostRss()
    try:
        assert "statm" in rss.source
    finally:
        rss.close()
