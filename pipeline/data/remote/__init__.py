"""Object storage (s3://): where data lives, one client, one retry policy, a bounded cache, publishing.

    urls.py     parse_location(value) -> Location; other schemes and mistyped URLs refused by name
    store.py    ObjectStore(bucket): head, get_range, get_to_file, put_file, put_bytes(create_only), list...
    retry.py    RetryPolicy: transient errors retried with full jitter within a time budget
    cache.py    ObjectCache(store, folder, limit_bytes): fetch/prefetch/release, shared by processes
    publish.py  publish(local_export, url) (manifest last), remote_manifest, open_remote -> RemoteExport
    errors.py   the project's errors for all of it (each names the URL and what to check)

Design, measurements and the publish rule: docs/object-storage.md.
"""
