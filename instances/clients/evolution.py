"""Calls to one Evolution API instance: the one place that sends replies."""

import asyncio
import base64
import binascii
import contextlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
from django.conf import settings

from instances.clients.aiohttp_transport import MAX_RESPONSE_BYTES
from instances.clients.http import OutboundError, OutboundRefused, clean_text, describe_body

if TYPE_CHECKING:
    from instances.models import InstanceConfig

# Provisioning calls are made while an operator waits on a page.
PROVISION_TIMEOUT = 10.0
# Evolution's create waits 5 s for the first QR code before it answers (with
# qrcode: true), and longer on a busy server: 10 s would cut it off half-way.
CREATE_TIMEOUT = 30.0


@dataclass(frozen=True)
class EvolutionTarget:
    """Where a reply goes: base URL, key and the instance name inside Evolution."""

    base_url: str
    api_key: str
    instance_name: str


def instance_target(instance: "InstanceConfig") -> EvolutionTarget:
    """The instance's own Evolution: its URL, its key, its name there."""
    return EvolutionTarget(
        base_url=instance.evolution_url,
        api_key=instance.evolution_key,
        instance_name=instance.evolution_instance_name,
    )


def sent_key_id(answer: dict[str, Any]) -> str:
    """The id WhatsApp gave a message sendText/sendMedia sent (its answer's key.id)."""
    key = answer.get("key")
    value = key.get("id") if isinstance(key, dict) else None
    return value if isinstance(value, str) else ""


# Evolution's own default page size for findMessages.
FIND_PAGE_SIZE = 50


@dataclass(frozen=True)
class StoredMessage:
    """A message as Evolution's findMessages answers it: the fields the hub reads."""

    key_id: str
    remote_jid: str
    from_me: bool
    text: str
    # messageTimestamp, unix seconds (Evolution's clock); None when missing.
    timestamp: int | None


@dataclass(frozen=True)
class MediaFile:
    """A received message's media as getBase64FromMediaMessage answers it."""

    data: bytes
    mime_type: str
    file_name: str


@dataclass(frozen=True)
class FoundMessages:
    records: list[StoredMessage]
    pages: int


class EvolutionClient:
    def __init__(self, *, target: EvolutionTarget, http: httpx.AsyncClient) -> None:
        self.base_url = target.base_url.rstrip("/")
        self.instance_name = target.instance_name
        self.instance_path = quote(target.instance_name, safe="")
        self.headers = {"apikey": target.api_key}
        self.http = http

    def _url(self, route: str) -> str:
        return f"{self.base_url}/{route}/{self.instance_path}"

    async def _post(self, route: str, body: dict[str, Any], timeout: float) -> httpx.Response:
        return await self.http.post(
            self._url(route), json=body, headers=self.headers, timeout=timeout
        )

    async def send_text(
        self,
        *,
        number: str,
        text: str,
        quoted: dict[str, Any] | None = None,
        delay_ms: int = 0,
    ) -> dict[str, Any]:
        """POST /message/sendText/{instance}; raises OutboundError.

        `quoted` ({"key": ..., "message": ...}) makes the reply quote a message;
        `delay_ms` has Evolution show "typing..." that long before it sends.
        """
        body: dict[str, Any] = {"number": number, "text": text}
        return await self._send("message/sendText", body, quoted=quoted, delay_ms=delay_ms)

    async def send_media(
        self,
        *,
        number: str,
        mediatype: str,
        media: str,
        mimetype: str,
        file_name: str,
        caption: str = "",
        quoted: dict[str, Any] | None = None,
        delay_ms: int = 0,
    ) -> dict[str, Any]:
        """POST /message/sendMedia/{instance} (`media`: a URL Evolution downloads, or
        base64); raises OutboundError like send_text."""
        body: dict[str, Any] = {
            "number": number,
            "mediatype": mediatype,
            "mimetype": mimetype,
            "media": media,
            "fileName": file_name,
        }
        if caption:
            body["caption"] = caption
        return await self._send("message/sendMedia", body, quoted=quoted, delay_ms=delay_ms)

    async def _send(
        self, route: str, body: dict[str, Any], *, quoted: dict[str, Any] | None, delay_ms: int
    ) -> dict[str, Any]:
        """A message out to WhatsApp: the one set of failure rules for every send."""
        if quoted is not None:
            body["quoted"] = quoted
        if delay_ms:
            body["delay"] = delay_ms
        # Evolution holds the request while it shows "typing...": the deadline
        # grows by that much.
        deadline = settings.EVOLUTION_TIMEOUT + delay_ms / 1000
        try:
            # A deadline on the whole call, not only on each read (see HttpAgent.run).
            async with asyncio.timeout(deadline):
                response = await self._post(route, body, deadline)
        except TimeoutError as exc:
            raise OutboundError(
                f"Evolution did not finish answering in {deadline:g}s; "
                "not retried, the reply may have been sent",
                retryable=False,
                maybe_sent=True,
            ) from exc
        except OutboundRefused as exc:
            # Refused by the hub (address or answer size): trying again changes nothing.
            raise OutboundError(f"Evolution call refused: {exc}", retryable=False) from exc
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Nothing reached Evolution: trying again cannot send twice.
            raise OutboundError(f"Evolution unreachable: {exc!r}", retryable=True) from exc
        except httpx.TimeoutException as exc:
            # Evolution may have sent the text; a retry could answer twice.
            raise OutboundError(
                f"Evolution did not answer in {deadline:g}s; "
                "not retried, the reply may have been sent",
                retryable=False,
                maybe_sent=True,
            ) from exc
        except httpx.TransportError as exc:
            # The connection dropped after the request was written: Evolution may
            # have sent the text. Retried, but only after asking Evolution
            # whether it did (webhooks/duplicates.py).
            raise OutboundError(
                f"Evolution connection failed: {exc!r}", retryable=True, maybe_sent=True
            ) from exc
        if response.status_code >= 300:
            # Evolution's own words, as provisioning shows them, not its raw body.
            raise OutboundError(
                evolution_error_text(response),
                retryable=response.status_code >= 500,
                status=response.status_code,
            )
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        return answer if isinstance(answer, dict) else {}

    async def find_messages(
        self,
        *,
        remote_jid: str | None = None,
        from_me: bool | None = None,
        key_id: str | None = None,
        between: tuple[datetime, datetime] | None = None,
        page: int = 1,
        page_size: int = FIND_PAGE_SIZE,
    ) -> FoundMessages:
        """POST /chat/findMessages/{instance}: the stored messages that match, newest first.

        Evolution 2.x filters on key.id / key.fromMe / key.remoteJid, and on
        messageTimestamp only when both ends are given (dates, as JS parses
        them). An instance that keeps no messages
        (DATABASE_SAVE_DATA_NEW_MESSAGE=false) answers an empty page, as for
        a message it does not have. Raises OutboundError; reading changes
        nothing on Evolution, so every failure without an answer is retryable.
        """
        key: dict[str, Any] = {}
        if key_id is not None:
            key["id"] = key_id
        if remote_jid is not None:
            key["remoteJid"] = remote_jid
        if from_me is not None:
            key["fromMe"] = from_me
        where: dict[str, Any] = {"key": key} if key else {}
        if between is not None:
            where["messageTimestamp"] = {"gte": _js_date(between[0]), "lte": _js_date(between[1])}
        body = {"where": where, "page": page, "offset": page_size}
        response = await self._safe_post("chat/findMessages", body, what="findMessages")
        return _found_messages(response, page_size=page_size)

    async def _safe_post(
        self,
        route: str,
        body: dict[str, Any],
        *,
        what: str,
        max_bytes: int | None = None,
        retry_400: str = "",
    ) -> httpx.Response:
        """A call that changes nothing Evolution sends (a read, a read receipt): every
        failure without an answer may be tried again. Raises OutboundError.

        404 (the instance, or on another server the route, is not there now) is
        worth asking again later, like a 5xx; so is a 400 whose body holds
        `retry_400` (getBase64FromMediaMessage's intermittent AggregateError).
        """
        timeout = settings.EVOLUTION_TIMEOUT
        extensions = {MAX_RESPONSE_BYTES: max_bytes} if max_bytes else None
        try:
            async with asyncio.timeout(timeout):
                response = await self.http.post(
                    self._url(route),
                    json=body,
                    headers=self.headers,
                    timeout=timeout,
                    extensions=extensions,
                )
        except OutboundRefused as exc:
            raise OutboundError(f"Evolution's {what} refused: {exc}", retryable=False) from exc
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise OutboundError(
                f"Evolution's {what} did not answer in {timeout:g}s", retryable=True
            ) from exc
        except httpx.TransportError as exc:
            raise OutboundError(
                f"Evolution's {what} failed: {transport_reason(exc)}", retryable=True
            ) from exc
        if response.status_code >= 300:
            status = response.status_code
            flaky = bool(retry_400) and status == 400 and retry_400 in response.text
            raise OutboundError(
                f"{what}: {evolution_error_text(response)}",
                retryable=status >= 500 or status == 404 or flaky,
                status=status,
            )
        return response

    async def get_base64(self, *, key: dict[str, Any], max_bytes: int) -> MediaFile:
        """POST /chat/getBase64FromMediaMessage/{instance}: a received message's media,
        decrypted by Evolution. `max_bytes` bounds the file; base64 makes it a third
        larger on the wire. Raises OutboundError (retryable: 5xx, 404, the
        intermittent 400 AggregateError, no answer)."""
        response = await self._safe_post(
            "chat/getBase64FromMediaMessage",
            {"message": {"key": key}, "convertToMp4": False},
            what="getBase64FromMediaMessage",
            max_bytes=max_bytes * 4 // 3 + 64 * 1024,
            retry_400="AggregateError",
        )
        try:
            answer = response.json()
            data = base64.b64decode(answer["base64"], validate=False)
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise OutboundError(
                f"getBase64FromMediaMessage answered no media: {describe_body(response)}",
                retryable=False,
            ) from exc
        mimetype = answer.get("mimetype")
        file_name = answer.get("fileName")
        return MediaFile(
            data=data,
            mime_type=mimetype if isinstance(mimetype, str) else "",
            file_name=file_name if isinstance(file_name, str) else "",
        )

    async def mark_read(self, *, remote_jid: str, message_id: str, participant: str = "") -> None:
        """POST /chat/markMessageAsRead/{instance}: blue ticks on a received message
        (in a group, its sender as `participant`). Raises OutboundError; the caller
        counts and forgets it."""
        key = {"remoteJid": remote_jid, "fromMe": False, "id": message_id}
        if participant:
            key["participant"] = participant
        await self._safe_post(
            "chat/markMessageAsRead", {"readMessages": [key]}, what="markMessageAsRead"
        )

    async def send_presence(self, *, number: str, delay_ms: int = 5000) -> None:
        """Show "typing..." while the agent works; a failure here changes nothing."""
        with contextlib.suppress(httpx.HTTPError):
            await self._post(
                "chat/sendPresence",
                {"number": number, "presence": "composing", "delay": delay_ms},
                # Evolution holds the request open for `delay` before answering.
                delay_ms / 1000 + 5.0,
            )

    # --- provisioning: errors become OutboundErrors with a readable message ---

    async def _request(
        self, method: str, path: str, body: Any = None, *, timeout: float
    ) -> httpx.Response:
        try:
            return await self.http.request(
                method, f"{self.base_url}{path}", json=body, headers=self.headers, timeout=timeout
            )
        except OutboundRefused as exc:
            raise OutboundError(
                f"Evolution at {self.base_url} was not called to the end: {exc}",
                retryable=False,
            ) from exc
        except httpx.TimeoutException as exc:
            raise OutboundError(
                f"Evolution at {self.base_url} did not answer within {timeout:g} s",
                retryable=True,
            ) from exc
        except httpx.TransportError as exc:
            raise OutboundError(
                f"Could not reach Evolution at {self.base_url}: {transport_reason(exc)}",
                retryable=True,
            ) from exc

    @staticmethod
    def _read_json(response: httpx.Response) -> Any:
        if response.status_code >= 300:
            raise OutboundError(
                evolution_error_text(response),
                retryable=response.status_code >= 500,
                status=response.status_code,
            )
        if not response.content.strip():
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise OutboundError(
                f"Evolution answered {response.status_code} with a body that is not JSON: "
                f"{describe_body(response)}",
                retryable=False,
                status=response.status_code,
            ) from exc

    async def fetch_instance(self, *, timeout: float = PROVISION_TIMEOUT) -> dict[str, Any] | None:
        """GET /instance/fetchInstances?instanceName=: the instance, None when there is none.

        Evolution checks the key of this call before anything else (unlike the
        routes of one instance, which answer 404 for a missing instance, or
        create, which answers 403 "already in use", whatever the key): a 401
        here means the key is wrong.
        """
        response = await self._request(
            "GET", f"/instance/fetchInstances?instanceName={self.instance_path}", timeout=timeout
        )
        if response.status_code == 404:
            return None
        body = self._read_json(response)
        for item in body if isinstance(body, list) else [body]:
            if not isinstance(item, dict):
                continue
            # 2.x answers {"name": ...}; 1.8 {"instance": {"instanceName": ...}}.
            inner = item.get("instance")
            names = (
                item.get("name"),
                inner.get("instanceName") if isinstance(inner, dict) else None,
            )
            if self.instance_name in names:
                return item
        return None

    async def create_instance(
        self, *, webhook: dict[str, Any] | None = None, timeout: float = CREATE_TIMEOUT
    ) -> bool:
        """POST /instance/create; True when created, False when the name is taken already.

        With `webhook`, Evolution stores it with the instance, so that a create
        whose answer never arrives still leaves the instance delivering to us.
        """
        body: dict[str, Any] = {
            "instanceName": self.instance_name,
            "integration": "WHATSAPP-BAILEYS",
            "qrcode": True,
        }
        if webhook is not None:
            body["webhook"] = webhook
        response = await self._request("POST", "/instance/create", body, timeout=timeout)
        if response.status_code in (400, 403, 409) and "already in use" in response.text:
            # Evolution 2.3.7: 403 'This name "x" is already in use.'
            return False
        self._read_json(response)
        return True

    async def connection_state(self, *, timeout: float = PROVISION_TIMEOUT) -> str:
        """GET /instance/connectionState/{instance}: "open", "connecting" or "close"."""
        response = await self._request(
            "GET", f"/instance/connectionState/{self.instance_path}", timeout=timeout
        )
        body = self._read_json(response)
        instance = body.get("instance") if isinstance(body, dict) else None
        state = instance.get("state") if isinstance(instance, dict) else None
        if not isinstance(state, str):
            raise OutboundError(
                "Evolution's connection state answer has no instance.state", retryable=False
            )
        return state

    async def connect(self, *, timeout: float = PROVISION_TIMEOUT) -> dict[str, Any]:
        """GET /instance/connect/{instance}: a QR code, {"count": 0}, or the open state."""
        response = await self._request(
            "GET", f"/instance/connect/{self.instance_path}", timeout=timeout
        )
        body = self._read_json(response)
        return body if isinstance(body, dict) else {}

    async def find_webhook(self, *, timeout: float = PROVISION_TIMEOUT) -> dict[str, Any] | None:
        """GET /webhook/find/{instance}: the stored webhook; None when there is none."""
        response = await self._request(
            "GET", f"/webhook/find/{self.instance_path}", timeout=timeout
        )
        body = self._read_json(response)
        return body if isinstance(body, dict) and body else None

    async def set_webhook(
        self, *, webhook: dict[str, Any], timeout: float = PROVISION_TIMEOUT
    ) -> None:
        """POST /webhook/set/{instance} with Evolution 2.x's nested `webhook` object."""
        response = await self._request(
            "POST", f"/webhook/set/{self.instance_path}", {"webhook": webhook}, timeout=timeout
        )
        self._read_json(response)


def _js_date(value: datetime) -> str:
    """2025-12-06T09:26:23.101Z: the form JavaScript's Date parses everywhere."""
    utc = value.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _stored_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    if isinstance(message.get("conversation"), str):
        return message["conversation"]
    extended = message.get("extendedTextMessage")
    text = extended.get("text") if isinstance(extended, dict) else None
    return text if isinstance(text, str) else ""


def _timestamp(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, dict) and isinstance(value.get("low"), int):
        # A Long.js value {low, high, unsigned}: low is signed 32-bit.
        return (value["low"] & 0xFFFFFFFF) + (int(value.get("high") or 0) << 32)
    return None


def _stored_message(record: Any) -> StoredMessage | None:
    key = record.get("key") if isinstance(record, dict) else None
    if not isinstance(key, dict) or not isinstance(key.get("id"), str):
        return None
    remote_jid = key.get("remoteJid")
    return StoredMessage(
        key_id=key["id"],
        remote_jid=remote_jid if isinstance(remote_jid, str) else "",
        from_me=key.get("fromMe") is True,
        text=_stored_text(record.get("message")),
        timestamp=_timestamp(record.get("messageTimestamp")),
    )


def _found_messages(response: httpx.Response, *, page_size: int) -> FoundMessages:
    """2.x answers {"messages": {"total", "pages", "currentPage", "records"}}; 1.8 a list."""
    try:
        body = response.json()
    except ValueError as exc:
        raise OutboundError(
            f"Evolution's findMessages answered {response.status_code} with a body that is "
            f"not JSON: {describe_body(response)}",
            retryable=False,
        ) from exc
    pages = 1
    if isinstance(body, dict) and isinstance(body.get("messages"), dict):
        found = body["messages"]
        records = found.get("records")
        pages = found.get("pages") if isinstance(found.get("pages"), int) else 1
    else:
        records = body
    if not isinstance(records, list):
        raise OutboundError(
            "Evolution's findMessages answer has no messages.records list: "
            f"{describe_body(response)}",
            retryable=False,
        )
    # A page is at most what was asked for, whatever the server sent.
    parsed = [_stored_message(record) for record in records[:page_size]]
    return FoundMessages(records=[m for m in parsed if m is not None], pages=pages)


def transport_reason(exc: BaseException) -> str:
    """ "Connection refused" rather than anyio's "All connection attempts failed"."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno) if cause.errno > 0 else str(cause.strerror)
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


def _message_of(body: Any) -> str:
    """The human part of an Evolution error body, whichever of its shapes it has."""
    if not isinstance(body, dict):
        return ""
    if body.get("code") == "LICENSE_REQUIRED":
        # Evolution 2.4 answers every call so until the server is registered.
        text = f"{body.get('error') or 'service not activated'} (LICENSE_REQUIRED): "
        text += "this Evolution server needs a license before it accepts API calls"
        if isinstance(body.get("register_url"), str):
            text += f"; register it at {body['register_url']}"
        return text
    response = body.get("response")
    message = response.get("message") if isinstance(response, dict) else body.get("message")
    if isinstance(message, list):
        message = "; ".join(m if isinstance(m, str) else json.dumps(m) for m in message)
    if isinstance(message, str) and message.strip(". "):
        return message
    error = body.get("error")
    return error if isinstance(error, str) else ""


def evolution_detail(response: httpx.Response) -> str:
    """The human message of an Evolution answer, parsed and bounded (never a raw HTML page)."""
    try:
        detail = clean_text(_message_of(response.json()))
    except ValueError:
        detail = ""
    return detail or describe_body(response)


def evolution_error_text(response: httpx.Response) -> str:
    """E.g. 'Evolution answered 404 Not Found: The "x" instance does not exist'."""
    detail = evolution_detail(response)
    text = f"Evolution answered {response.status_code} {response.reason_phrase}"
    if detail != response.reason_phrase:
        text += f": {detail}"
    if response.status_code == 401:
        text += " (check the instance's Evolution API key)"
    return text
