"""Put first on PYTHONPATH to hide uvloop: the service then runs on the default asyncio loop (a benchmark variant)."""

raise ImportError("uvloop hidden by bench/_no_uvloop")
