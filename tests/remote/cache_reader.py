"""A reader process for tests/remote/test_cache.py: ``python -m tests.remote.cache_reader '<json>'``.

Reads every object through a shared ObjectCache (in its own seeded order, optionally two ahead), releasing
each once read, and prints ``{"ok": bool, "misses": n, "hits": n}``. A plain subprocess (not a
multiprocessing pool, whose resource tracker would outlive the test as a child of the test process).
"""

from __future__ import annotations

import json
import random
import sys
import time

from pipeline.data.remote.cache import ObjectCache
from pipeline.data.remote.store import ObjectStore, sha256_file


def main(argv: list[str]) -> int:
    a = json.loads(argv[0])
    items = [tuple(it) for it in a["items"]]
    random.Random(a["seed"]).shuffle(items)
    ok = True
    with ObjectCache(ObjectStore(a["bucket"]), a["folder"], a["limit"], threads=2) as cache:
        for i, item in enumerate(items):
            if a["prefetch"]:
                cache.prefetch(items[i + 1 : i + 3])
            ok &= sha256_file(cache.fetch(*item)) == item[2]
            time.sleep(0.002)
            cache.release(item[0])
        s = cache.stats()
    print(json.dumps({"ok": ok, "misses": s.misses, "hits": s.hits}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
