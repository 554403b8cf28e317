"""The light S3 request path: listing pages parsed from hostile XML, and error answers.

The HTTP tests run a real (tiny) HTTP server on 127.0.0.1 that answers what a
store may answer, including a CopyObject's ``200 OK`` whose body is an error.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import ClassVar

import pytest
from botocore.credentials import Credentials

from agent.store.signed import AnswerError, MalformedAnswerError, SignedRequests, _parse_page

PAGE = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>b</Name><Prefix>p%2F</Prefix><KeyCount>2</KeyCount><MaxKeys>2</MaxKeys>
  <EncodingType>url</EncodingType>
  <IsTruncated>true</IsTruncated>
  <NextContinuationToken>tok+en/=</NextContinuationToken>
  <Contents><Key>p/a+b%26c%2B.txt</Key><LastModified>2026-12-03T10:00:00.000Z</LastModified>
    <ETag>&quot;abc&quot;</ETag><Size>5</Size></Contents>
  <Contents><Key>p/%C3%BC%0A.dwg</Key><LastModified>2026-12-03T10:00:01.000Z</LastModified>
    <ETag>"def-2"</ETag><Size>7</Size></Contents>
  <CommonPrefixes><Prefix>p/sub%2Bdir/</Prefix></CommonPrefixes>
</ListBucketResult>"""


def test_a_listing_page_decodes_keys_etags_times_and_the_continuation() -> None:
    page = _parse_page(PAGE)
    assert ["p/a b&c+.txt", "p/\u00fc\n.dwg"] == [o.key for o in page.objects]
    assert ['"abc"', '"def-2"'] == [o.etag for o in page.objects]
    assert [5, 7] == [o.size for o in page.objects]
    assert datetime(2026, 12, 3, 10, 0, tzinfo=UTC) == page.objects[0].last_modified
    assert ["p/sub+dir/"] == page.prefixes
    assert page.truncated
    assert "tok+en/=" == page.token


def test_a_last_page_is_not_truncated() -> None:
    page = _parse_page(b"<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>")
    assert (page.objects, page.prefixes, page.truncated, page.token) == ([], [], False, None)


@pytest.mark.parametrize(
    "body",
    [
        b"not xml at all",
        b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><ListBucketResult>&b;</ListBucketResult>',
        b'<!DOCTYPE l [<!ENTITY x SYSTEM "file:///etc/passwd">]><ListBucketResult>&x;'
        b"</ListBucketResult>",
    ],
    ids=["garbage", "entity-expansion", "external-entity"],
)
def test_a_listing_that_is_not_plain_xml_is_refused_as_malformed(body: bytes) -> None:
    """Garbage, entity expansion, external entities: ``MalformedAnswerError`` (retried)."""
    with pytest.raises(MalformedAnswerError, match="not a ListObjectsV2 page"):
        _parse_page(body)


class _Store(http.server.BaseHTTPRequestHandler):
    answers: ClassVar[dict[str, tuple[int, bytes]]] = {}
    seen: ClassVar[list[tuple[str, str, dict[str, str]]]] = []

    def _answer(self) -> None:
        self.seen.append((self.command, self.path, dict(self.headers.items())))
        status, body = self.answers.get(self.path.split("?")[0], (404, b""))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer()

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def store() -> Iterator[tuple[SignedRequests, type[_Store]]]:
    handler = type("Handler", (_Store,), {"answers": {}, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="test-s3-answers")
    thread.start()
    signed = SignedRequests(
        f"http://127.0.0.1:{server.server_port}/bkt/",
        "us-east-1",
        Credentials("AKIDEXAMPLE", "secret"),
        verify=True,
        connect_timeout=2,
        read_timeout=5,
        pool_size=2,
    )
    try:
        yield signed, handler
    finally:
        signed.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_a_copy_answered_200_with_an_error_body_is_an_error(
    store: tuple[SignedRequests, type[_Store]],
) -> None:
    """S3 may fail a CopyObject after it sent 200: the body says so, and we must see it."""
    signed, handler = store
    handler.answers["/bkt/dst%20key"] = (
        200,
        b"<?xml version='1.0'?>\n<Error><Code>InternalError</Code>"
        b"<Message>We encountered an internal error</Message></Error>",
    )
    with pytest.raises(AnswerError) as raised:
        signed.copy("dst key", {"x-amz-copy-source": "bkt/src key"})
    assert (500, "InternalError") == (raised.value.status, raised.value.code)
    method, _path, headers = handler.seen[-1]
    assert "PUT" == method
    assert "bkt/src%20key" == headers["x-amz-copy-source"]
    assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")


def test_an_error_answer_carries_its_status_and_s3_code(
    store: tuple[SignedRequests, type[_Store]],
) -> None:
    signed, handler = store
    handler.answers["/bkt/k"] = (
        412,
        b"<Error><Code>PreconditionFailed</Code><Message>At least one</Message></Error>",
    )
    with pytest.raises(AnswerError) as raised:
        signed.copy("k", {"x-amz-copy-source": "bkt/s", "x-amz-copy-source-if-match": '"e"'})
    assert (412, "PreconditionFailed", "At least one") == (
        raised.value.status,
        raised.value.code,
        raised.value.message,
    )


def test_a_copy_answer_without_an_etag_is_an_error(
    store: tuple[SignedRequests, type[_Store]],
) -> None:
    signed, handler = store
    handler.answers["/bkt/k"] = (200, b"<CopyObjectResult></CopyObjectResult>")
    with pytest.raises(AnswerError):
        signed.copy("k", {"x-amz-copy-source": "bkt/s"})
