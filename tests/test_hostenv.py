"""vaebm_jax.hostenv: the CLI's GLIBC_TUNABLES for huge pages (XLA's per-step buffers page-fault far less)."""

import os
import subprocess
import sys

import pytest

from vaebm_jax import hostenv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_huge_pages = pytest.mark.skipif(not hostenv.huge_pages_available(),
                                      reason="needs Linux, glibc >= 2.35 and transparent huge pages")


@needs_huge_pages
def test_the_tunable_is_added_once_beside_others_and_can_be_turned_off():
  env = hostenv.with_huge_pages({"PATH": "/bin"})
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": hostenv.TUNABLE}
  assert hostenv.with_huge_pages(env) is None                                     # nothing left to add
  other = hostenv.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert other["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{hostenv.TUNABLE}"
  assert hostenv.with_huge_pages({hostenv.OPT_OUT: "0"}) is None


def test_nothing_is_added_where_huge_pages_are_not_available(monkeypatch):
  monkeypatch.setattr(hostenv, "_glibc_version", lambda: (2, 31))
  assert hostenv.with_huge_pages({}) is None


_CHILD = """
import ctypes, os, resource, sys
from vaebm_jax import hostenv
hostenv.reexec_with_huge_pages()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(64 << 20)              # 64 MB through glibc's malloc (a fresh mmapped block), as XLA's are
ctypes.memset(block, 1, 64 << 20)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(os.environ.get("GLIBC_TUNABLES", ""), faults, sys.argv[1:])
"""


@needs_huge_pages
def test_the_process_restarts_itself_with_the_tunable_and_its_large_blocks_fault_in_huge_pages():
  def child(**env):
    out = subprocess.run([sys.executable, "-c", _CHILD, "--flag=1"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, **env), check=True).stdout.split()
    return out[0] if len(out) == 3 else "", int(out[-2]), out[-1]

  tunables, faults, argv = child()
  assert hostenv.TUNABLE in tunables and argv == "['--flag=1']"     # re-executed once, same arguments
  with open(hostenv._THP) as f:
    if "[always]" in f.read():
      return                        # every large mapping gets huge pages already; the tunable adds nothing
  _, faults_4k, _ = child(**{hostenv.OPT_OUT: "0"})
  assert faults_4k >= 64 * 256 * 0.9                                # one fault per 4-KB page without
  assert faults < faults_4k / 4, (faults, faults_4k)                # 2-MB pages with it
