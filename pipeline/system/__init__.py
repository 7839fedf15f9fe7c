"""The machine the job runs on, measured: memory the run holds, disk reads, memory limits, the page cache.

from pipeline.system.memory import MemorySampler, snapshot     # PSS of the run, budgets
from pipeline.system.iocount import disk_read_bytes            # bytes fetched from disk, workers included
from pipeline.system.cgroups import MemoryCgroup, memory_limit # a memory-capped cgroup; the current limit
from pipeline.system.page_cache import drop                    # an export's pages out of the cache
from pipeline.system.disk import sequential_read               # the disk's sequential bandwidth
from pipeline.system.headroom import headroom, require         # memory the job may still take
"""
