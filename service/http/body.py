"""Request bodies: size limits enforced while reading, raw image or multipart files."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from ..errors import BadRequestError, ClientGoneError, PayloadTooLargeError
from ..images.preprocess import check_media_type, media_type_of


@dataclass(frozen=True)
class ImagePart:
    data: bytes
    filename: str | None = None


async def read_limited(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequestError(f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise PayloadTooLargeError(
                f"the body is {int(declared)} bytes, over the limit of {limit}; send smaller or fewer images"
            )
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:  # chunked uploads have no Content-Length: count as they arrive
                raise PayloadTooLargeError(
                    f"the body exceeds the limit of {limit} bytes; send smaller or fewer images"
                )
            chunks.append(chunk)
    except ClientDisconnect:  # gone before its body arrived: 499, as for a later disconnect
        raise ClientGoneError("the client disconnected while sending its body") from None
    return b"".join(chunks)


async def read_images(request: Request, limit: int, max_images: int) -> list[ImagePart]:
    media_type = media_type_of(request.headers.get("content-type"))
    if media_type == "multipart/form-data":
        return await _read_multipart(request, limit, max_images)
    check_media_type(media_type)
    body = await read_limited(request, limit)
    if not body:
        raise BadRequestError("the request has no body; send the image bytes, e.g. curl --data-binary @cat.jpg")
    return [ImagePart(body)]


async def _read_multipart(request: Request, limit: int, max_images: int) -> list[ImagePart]:
    body = await read_limited(request, limit)

    async def stream():
        yield body
        yield b""

    try:
        form = await MultiPartParser(
            request.headers, stream(), max_files=max_images, max_fields=max_images, max_part_size=limit
        ).parse()
    except MultiPartException as exc:
        raise BadRequestError(f"the multipart body is malformed: {exc.message}") from exc
    parts = []
    try:
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                parts.append(ImagePart(await value.read(), value.filename))
    finally:
        await form.close()
    if not parts:
        raise BadRequestError(
            "the multipart body has no files; send each image as a file field, e.g. curl -F image=@cat.jpg"
        )
    return parts
