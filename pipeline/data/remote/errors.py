"""The errors of object storage, in the project's words.

Every client-library error that leaves ``pipeline.data.remote`` is one of these, and each message names
the URL it concerns and what to check -- never a credential. ``RemoteUnavailable`` is what a transient
fault becomes once the retry budget is spent (``retry.py``); the others are raised at once.
"""

from __future__ import annotations

from pipeline.data.integrity import ExportError, IntegrityError


class RemoteError(ExportError):
    """Object storage that cannot be used as asked (an ExportError: callers that handle a local export's
    failures handle these too)."""


class LocationError(RemoteError, ValueError):
    """A data location the project does not support, or a malformed one (refused before any work)."""


class BucketNotFound(RemoteError):
    """The bucket does not exist at this endpoint."""


class AccessDenied(RemoteError):
    """The credentials were refused (missing, wrong, expired, or without permission for this URL)."""


class ObjectNotFound(RemoteError):
    """No object at this URL."""


class AlreadyExists(RemoteError):
    """A create-only put found the object already there (another writer was first)."""


class RemoteUnavailable(RemoteError):
    """The endpoint kept failing with transient errors (connection refused/reset, timeouts, 5xx,
    throttling) until the retry budget ran out."""


class CorruptObject(RemoteError, IntegrityError):
    """An object whose bytes do not match the checksum its export recorded, also when fetched again."""


class CacheError(RemoteError):
    """The local object cache cannot hold what is asked of it (a limit too small for what is pinned)."""
