"""The object store client: create-only writes, reads and listings over any S3-compatible endpoint."""

from __future__ import annotations

import functools
import json
import random
import time
from typing import Any, Callable, TypeVar

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from orchard.config import ObjectStoreConfig, secret_value
from schemas.errors import OrchardError

# S3 error codes that mean "the key (or bucket) is not there", as different servers spell them.
_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}

# How long a store that stops answering gets to come back before a call fails. Retry k (1-based) waits about
# RETRY_BASE_S * 2**(k-1) s, at most RETRY_MAX_S: with the default `retries = 4` that is 2 + 4 + 8 + 16 = 30 s.
# botocore's own backoff for these errors is 50 ms-scale (its 4 retries gave up in under 1 s), shorter than a
# store restart; and a landing that fails throws away the whole grown shard, while waiting costs a nightly little.
RETRY_BASE_S = 2.0
RETRY_MAX_S = 30.0
# Answers that mean "busy or restarting, ask again" (botocore's transient and throttling codes).
_RETRY_STATUS = {429, 500, 502, 503, 504}
_RETRY_CODES = {"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "SlowDown", "Throttling",
                "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException", "ServiceUnavailable",
                "InternalError"}

T = TypeVar("T")


class StoreError(OrchardError):
    """An object store call failed; the message names the bucket, the key and the reason."""

    def __init__(self, bucket: str, key: str, reason: str) -> None:
        super().__init__(f"s3://{bucket}/{key}: {reason}")
        self.bucket = bucket
        self.key = key
        self.reason = reason


class ObjectMissing(StoreError):
    """The key does not exist."""


class StoreUnavailable(StoreError):
    """The store did not answer (or only with busy/server errors) through every retry; names endpoint and attempts."""

    transient = True  # it may be back in a minute: the task that met it is retried

    def __init__(self, bucket: str, key: str, endpoint: str, attempts: int, waited_s: float, last: Exception) -> None:
        unreachable = isinstance(last, BotoConnectionError | HTTPClientError)
        super().__init__(
            bucket, key,
            f"object store {endpoint} (bucket {bucket}) {'unreachable' if unreachable else 'failing'} "
            f"after {attempts} attempts over {waited_s:.1f} s; last error: {_reason(last)}",
        )
        self.endpoint = endpoint
        self.attempts = attempts
        self.waited_s = waited_s


def retry_delay_s(retry: int) -> float:
    """Return the longest wait before retry number `retry` (1-based) of a call the store did not answer."""
    return min(RETRY_BASE_S * 2 ** (retry - 1), RETRY_MAX_S)


def _retryable(exc: Exception) -> bool:
    """Whether `exc` says the store is down, restarting or busy (so asking again later may succeed)."""
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status in _RETRY_STATUS or _code(exc) in _RETRY_CODES
    return False


def s3_client(
    cfg: ObjectStoreConfig,
    *,
    max_attempts: int | None = None,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 60.0,
) -> Any:
    """Return a boto3 S3 client for `cfg` with path-style addressing (what local S3 servers expect)."""
    if not cfg.endpoint_url:
        raise StoreError(cfg.bucket, "", "object_store.endpoint_url is empty (was the embedded store started?)")
    config = BotoConfig(
        s3={"addressing_style": "path"},
        # ObjectStore passes max_attempts=1 and retries itself, on a schedule long enough to outlast a restart.
        retries={"total_max_attempts": (cfg.retries + 1) if max_attempts is None else max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        # Newer botocore adds CRC checksums (aws-chunked uploads) to every put; several S3-compatible
        # servers reject those, and shard files carry their own sha256 in the manifest anyway.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=cfg.endpoint_url,
        aws_access_key_id=cfg.access_key_id,
        aws_secret_access_key=secret_value(cfg.secret_access_key),
        region_name=cfg.region,
        config=config,
    )


@functools.lru_cache(maxsize=16)
def _shared_client(cfg: ObjectStoreConfig) -> Any:
    """Return this process's client for the store `cfg`: one per store, shared by every ObjectStore and thread.

    A boto3 client costs ~180 ms of CPU and ~12 MB to make (its session loads botocore's service models;
    measured over 100 of them); a store made per shard and stage made hundreds a run. Clients are
    thread-safe (sessions are not: each client gets its own, once).
    """
    return s3_client(cfg, max_attempts=1)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _reason(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', '?')}: {err.get('Message', '') or exc}"
    return f"{type(exc).__name__}: {exc}"


class ObjectStore:
    """One bucket of an S3-compatible store, with create-only writes.

    A call the store does not answer (refused or dropped connection, timeout, 5xx, throttling) is retried
    `cfg.retries` times, waiting `retry_delay_s(k)` before retry k; then it raises `StoreUnavailable`.
    """

    def __init__(self, cfg: ObjectStoreConfig) -> None:
        self.cfg = cfg
        self.bucket = cfg.bucket
        self._s3 = _shared_client(cfg)

    def uri(self, key: str) -> str:
        """Return `s3://bucket/key`."""
        return f"s3://{self.bucket}/{key}"

    def _call(self, key: str, request: Callable[[], T]) -> T:
        """Return `request()`, retried while the store is unreachable or busy; `StoreUnavailable` when it stays so."""
        started = time.monotonic()
        for retry in range(self.cfg.retries + 1):
            if retry:
                # Jitter keeps concurrent shard tasks from all knocking at the same instant when the store returns.
                time.sleep(retry_delay_s(retry) * (0.75 + 0.25 * random.random()))
            try:
                return request()
            except (BotoCoreError, ClientError) as exc:
                if not _retryable(exc):
                    raise
                last = exc
        raise StoreUnavailable(self.bucket, key, self.cfg.endpoint_url, self.cfg.retries + 1,
                               time.monotonic() - started, last) from last

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists."""
        try:
            self._call("", lambda: self._s3.head_bucket(Bucket=self.bucket))
            return
        except ClientError as exc:
            if _code(exc) not in _MISSING:
                raise StoreError(self.bucket, "", _reason(exc)) from exc
        except BotoCoreError as exc:
            raise StoreError(self.bucket, "", _reason(exc)) from exc
        try:
            self._call("", lambda: self._s3.create_bucket(Bucket=self.bucket))
        except ClientError as exc:
            # Another writer may have created it between our two calls.
            if _code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise StoreError(self.bucket, "", _reason(exc)) from exc
        except BotoCoreError as exc:
            raise StoreError(self.bucket, "", _reason(exc)) from exc

    def put_new(self, key: str, body: bytes) -> bool:
        """Write `body` at `key` only if no object is there; return False when one already is."""
        try:
            self._call(key, lambda: self._s3.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*"))
        except ClientError as exc:
            # 412 is the answer to If-None-Match on an existing key; 409 is what some servers
            # send when a concurrent conditional write to the same key is in flight. A retried put whose
            # first attempt did land also gets 412: landing treats "already there" as such anyway.
            if _code(exc) in {"PreconditionFailed", "412", "ConditionalRequestConflict"}:
                return False
            raise StoreError(self.bucket, key, _reason(exc)) from exc
        except BotoCoreError as exc:
            raise StoreError(self.bucket, key, _reason(exc)) from exc
        return True

    def get(self, key: str) -> bytes:
        """Return the object's bytes; `ObjectMissing` if there is none."""
        try:
            # The body is read inside the retried call: a connection dropped mid-body is retried too.
            return self._call(key, lambda: self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise ObjectMissing(self.bucket, key, "no such key") from exc
            raise StoreError(self.bucket, key, _reason(exc)) from exc
        except BotoCoreError as exc:
            raise StoreError(self.bucket, key, _reason(exc)) from exc

    def get_json(self, key: str) -> Any:
        """Return the object parsed as JSON."""
        body = self.get(key)
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(self.bucket, key, f"not valid JSON: {exc}") from exc

    def exists(self, key: str) -> bool:
        """Return whether an object is stored at `key`."""
        try:
            self._call(key, lambda: self._s3.head_object(Bucket=self.bucket, Key=key))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return False
            raise StoreError(self.bucket, key, _reason(exc)) from exc
        except BotoCoreError as exc:
            raise StoreError(self.bucket, key, _reason(exc)) from exc
        return True

    def list_keys(self, prefix: str) -> list[str]:
        """Return every key under `prefix`, sorted."""

        def listing() -> list[str]:
            keys: list[str] = []
            for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(item["Key"] for item in page.get("Contents", []))
            return keys

        try:
            # Retried whole: a listing cut off between pages starts again from the first.
            return sorted(self._call(prefix, listing))
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(self.bucket, prefix, _reason(exc)) from exc

    def delete(self, key: str) -> None:
        """Delete the object at `key` (no error if it is already gone)."""
        try:
            self._call(key, lambda: self._s3.delete_object(Bucket=self.bucket, Key=key))
        except ClientError as exc:
            if _code(exc) not in _MISSING:
                raise StoreError(self.bucket, key, _reason(exc)) from exc
        except BotoCoreError as exc:
            raise StoreError(self.bucket, key, _reason(exc)) from exc
