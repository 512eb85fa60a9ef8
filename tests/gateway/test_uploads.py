"""The multipart/form-data bodies of POST /predict and /predict/batch, as browsers, curl and hostile
clients send them: each file kept byte for byte, every bad body a 400 that names what is wrong."""

from __future__ import annotations

import pytest

from services.gateway.errors import ApiError
from services.gateway.uploads import MAX_PARTS, files

CT = "multipart/form-data; boundary=zz"


def part(name: str, data: bytes, filename: str | None = None, headers: str = "") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return f"--zz\r\nContent-Disposition: {disposition}\r\n{headers}\r\n".encode() + data + b"\r\n"


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + b"--zz--\r\n"


def refusal(body: bytes, content_type: str | None = CT, field: str = "file") -> str:
    with pytest.raises(ApiError) as err:
        files(body, content_type, field)
    assert err.value.status == 400
    return str(err.value.message)


def test_files_are_kept_byte_for_byte_in_body_order() -> None:
    tricky = b"\r\n--z\r\nx--zz\r\n\x00\xff" * 50  # CRLFs and near-boundaries inside the data
    body = form(part("files", b"first", "a.png", "Content-Type: image/png\r\n"), part("note", b"ignored"),
                part("files", tricky, "b.png"), part("files", b"", "empty.png"))
    uploads = files(body, CT, "files")
    assert [(u.filename, u.data) for u in uploads] == [("a.png", b"first"), ("b.png", tricky), ("empty.png", b"")]
    # A preamble before the first boundary and an epilogue after the last are allowed (RFC 2046).
    assert files(b"preamble\r\n" + form(part("file", b"x", "x.png")) + b"epilogue", CT, "file")[0].data == b"x"


def test_filenames_as_clients_send_them() -> None:
    assert files(form(part("file", b"x", "t-shirt ñ 👕.png")), CT, "file")[0].filename == "t-shirt ñ 👕.png"
    assert files(form(part("file", b"x")), CT, "file")[0].filename == ""  # no filename at all
    body = form(part("file", b"x", "x.png"))
    quoted = 'multipart/form-data; boundary="zz"; charset=utf-8'  # a quoted boundary, other parameters
    assert files(body, quoted, "file")[0].data == b"x"


def test_bad_bodies_get_a_400_that_names_the_problem() -> None:
    assert "image/png" in refusal(b"raw", "image/png")
    assert "'none'" in refusal(b"raw", None)
    assert "'multipart/form-data'" in refusal(b"raw", "multipart/form-data")  # no boundary
    assert "form field 'file'" in refusal(form(part("other", b"x", "x.png")))
    assert "truncated" in refusal(b'--zz\r\nContent-Disposition: form-data; name="file"\r\n\r\nab')
    assert "truncated" in refusal(b"no parts here")
    assert "malformed" in refusal(b"--zz\r\nX-No-Disposition: 1\r\n\r\nab\r\n--zz--\r\n")
    assert "malformed" in refusal(b"--zz\r\nContent-Disposition: form-data; name=\"file\"; " + b"a" * 10_000 +
                                  b"\r\n\r\nab\r\n--zz--\r\n")  # a header line longer than any browser sends
    assert "malformed" in refusal(b"--zz\r\nContent-Disposition: form-data; name=\"file\"\r\n" +
                                  b"".join(b"X-%d: 1\r\n" % i for i in range(50)) + b"\r\nab\r\n--zz--\r\n")


def test_a_form_of_more_parts_than_any_batch_is_refused_before_its_end() -> None:
    body = form(*[part("files", b"x", f"{i}.png") for i in range(MAX_PARTS + 1)])
    assert f"more than {MAX_PARTS} parts" in refusal(body, field="files")
    assert len(files(form(*[part("files", b"x", f"{i}.png") for i in range(MAX_PARTS)]), CT, "files")) == MAX_PARTS
