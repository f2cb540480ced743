"""Every module of the product imports on its own (aiohttp's test_circular_imports): an import cycle that works only
because of the order other modules happen to be imported in fails here. One fresh interpreter imports each module
after forgetting every module of ours (third-party ones stay loaded, so this takes a second, not a minute)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for package in ("service", "actors", "tiers")
    for p in (ROOT / package).rglob("*.py")
    if p.name != "__main__.py"  # an entry point runs when imported
)

_EACH_ON_ITS_OWN = """
import importlib, sys, threading, socket
ours = ("service", "actors", "tiers")
opened = []
real = socket.socket.connect
socket.socket.connect = lambda self, *a: opened.append(a) or real(self, *a)
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ours]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as err:
        failed.append(f"{name}: {type(err).__name__}: {err}")
print("\\n".join(failed))
assert not failed, failed
assert not opened, f"connected at import time: {opened}"
assert threading.active_count() == 1, f"threads started at import time: {threading.enumerate()}"
"""


def test_every_module_imports_on_its_own_and_starts_nothing() -> None:
    assert len(MODULES) > 30
    proc = subprocess.run(
        [sys.executable, "-c", _EACH_ON_ITS_OWN, *MODULES], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
