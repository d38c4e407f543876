"""CloudEvents (what Knative Eventing delivers to a model): the event's data is the V1 request.

kserve reads binary-mode events (`ce-*` headers) itself, but answers broken JSON data as if it
were audio, and takes a structured event (`application/cloudevents+json`) only when it carries
`time`, an attribute the spec makes optional. The CloudEvents SDK reads both modes per the spec;
the data is then what a plain V1 body would be: audio bytes (`datacontenttype` audio/*, or
`data_base64` in a structured event), or JSON.
"""

from typing import Any, Mapping, Optional

from cloudevents.exceptions import GenericException
from cloudevents.http import from_http
from cloudevents.sdk.converters.util import has_binary_headers

from ..errors import ClientInputError, shown

STRUCTURED = "application/cloudevents+json"


def mode(headers: Mapping[str, str]) -> Optional[str]:
    """How a request is a CloudEvent: "binary" (its attributes in ce-* headers), "structured" (the
    event in the body, its content type with or without parameters), or None: it is not one."""
    if has_binary_headers(headers):
        return "binary"
    return "structured" if media_type(headers.get("content-type", "")) == STRUCTURED else None


def media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def unwrap(body: bytes, headers: Mapping[str, str]) -> tuple[bytes, str, dict[str, Any]]:
    """The event's data as bytes, its media type, and its attributes (for kserve's answering event)."""
    try:
        event = from_http(dict(headers), body, data_unmarshaller=lambda data: data)
    # The SDK's own errors, and what its JSON parsing lets through: not UTF-8, not JSON, not an
    # object, nested past the recursion limit.
    except (GenericException, ValueError, AttributeError, TypeError, RecursionError) as exc:
        raise ClientInputError(f"not a valid CloudEvent: {shown(str(exc))}") from None
    data = event.get_data()
    if data is None:
        raise ClientInputError("the CloudEvent has no data: send the audio, or a V1 request, as its data")
    attributes = dict(event.get_attributes())
    content_type = attributes.get("datacontenttype", "")
    if not isinstance(content_type, str):
        raise ClientInputError(f"the CloudEvent's datacontenttype must be a string, got {shown(content_type)}")
    if not isinstance(data, (bytes, str)):
        raise ClientInputError(f"the CloudEvent's data must be audio or a V1 request, got {shown(data)}")
    return (data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data), content_type, attributes
