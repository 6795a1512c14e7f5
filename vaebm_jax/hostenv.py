"""The process environment of a run on a Linux host: glibc's malloc asked to back its large blocks with
transparent huge pages.

XLA:CPU allocates each execution's temporary buffers afresh (`posix_memalign`, hence `mmap` for large
blocks) and frees them when the execution ends, so every step touches gigabytes of new pages: 0.78 M
4-KB page faults per CIFAR-10 NVAE training step (3.2 GB of temporaries), with the kernel's fault
handling and zeroing on every thread's critical path. glibc >= 2.35 madvises its mmapped blocks for
transparent huge pages when started with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`; the same step then
takes ~2 k faults, and runs 10-15 % faster (experiments/RESULTS.md, issue 10).

A tunable is read once, when the process starts, so `python -m vaebm_jax.main` re-executes itself with
it (`reexec_with_huge_pages`) before JAX loads; `experiments/benchmark.py` starts its workers with it.
Code of your own that imports `sample_fn` gets the same by starting Python with the variable set.
`VAEBM_JAX_HUGE_PAGES=0` turns it off. Nothing changes where glibc is older than 2.35, the kernel's
transparent huge pages are `never`, or the host is not Linux.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "VAEBM_JAX_HUGE_PAGES"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int]:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()       # e.g. "glibc 2.36"
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else (0, 0)
  except (AttributeError, ValueError, OSError):
    return (0, 0)


def huge_pages_available() -> bool:
  """Linux with glibc >= 2.35 and transparent huge pages that an madvise can get."""
  if not sys.platform.startswith("linux") or _glibc_version() < (2, 35):
    return False
  try:
    with open(_THP) as f:
      mode = f.read()
  except OSError:
    return False
  return "[always]" in mode or "[madvise]" in mode


def with_huge_pages(environ: Mapping[str, str]) -> Optional[dict]:
  """A copy of `environ` whose GLIBC_TUNABLES also asks for huge pages; None where there is nothing to
  add (already asked for, turned off with VAEBM_JAX_HUGE_PAGES=0, or not available on this host)."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if environ.get(OPT_OUT, "1") == "0" or "glibc.malloc.hugetlb" in tunables or not huge_pages_available():
    return None
  return dict(environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE)


def reexec_with_huge_pages() -> None:
  """Replaces this process by the same command with `with_huge_pages(os.environ)`, where that adds
  something; returns otherwise. Call it first thing, before JAX (or anything that allocates much) loads."""
  env = with_huge_pages(os.environ)
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
