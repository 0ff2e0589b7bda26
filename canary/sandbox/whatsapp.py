"""The platform's WhatsApp webhook, as Twilio calls it: `POST /whatsapp/webhook`, form-encoded, signed.

The signature is checked with twilio's own RequestValidator over the URL Twilio called: `PLATFORM_PUBLIC_URL`
(the proxy or tunnel in front of the platform) when set, else the URL as received. The auth token comes from
`TWILIO_AUTH_TOKEN`. Both are read when the app is built, like a real service reads its settings at start.
Accepted messages and refused attempts are listed at `GET /_sandbox/whatsapp/messages`; only a message without
the synthetic marker would become a conversation, so tests can prove the canary leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from twilio.request_validator import SIGNATURE_HEADER, RequestValidator
from twilio.twiml.messaging_response import MessagingResponse

from canary.sandbox.faults import FAULTS, HANG_SECONDS

DEFAULT_AUTH_TOKEN = "sandbox-twilio-auth-token"
WEBHOOK_PATH = "/whatsapp/webhook"
FAULT_DEFAULTS: dict[str, Any] = {"whatsapp_webhook": "ok"}
# skip_validation accepts anything; accept_unsigned is the subtler bug: a present signature is checked, a request
# without one is let through.
FAULT_CHOICES = {
    "whatsapp_webhook": ("ok", "error", "hang", "skip_validation", "accept_unsigned", "reject_all", "bad_twiml"),
}
_KEEP = 200  # how many received requests the inspection lists remember
_TWIML = "application/xml"


@dataclass
class WhatsAppInbox:
    """What the webhook saw, for tests; `conversations` is what a real platform would have stored."""

    auth_token: str
    public_url: str | None
    messages: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=_KEEP))
    refused: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=_KEEP))
    conversations: dict[str, dict[str, str]] = field(default_factory=dict)

    def signed_url(self, request: web.Request) -> str:
        """The URL Twilio signed: the public one when the platform sits behind a proxy, else the one received."""
        if self.public_url:
            return self.public_url.rstrip("/") + request.rel_url.path_qs
        return str(request.url)


INBOX = web.AppKey("whatsapp_inbox", WhatsAppInbox)


def add_routes(app: web.Application) -> None:
    app[INBOX] = WhatsAppInbox(
        auth_token=os.environ.get("TWILIO_AUTH_TOKEN") or DEFAULT_AUTH_TOKEN,
        public_url=os.environ.get("PLATFORM_PUBLIC_URL") or None,
    )
    app.router.add_post(WEBHOOK_PATH, _webhook)
    app.router.add_get("/_sandbox/whatsapp/messages", _list_messages)


async def _webhook(request: web.Request) -> web.Response:
    mode = request.app[FAULTS]["whatsapp_webhook"]
    if mode == "hang":
        await asyncio.sleep(HANG_SECONDS)
    if mode == "error":
        return web.Response(status=500, text="Internal Server Error")
    inbox = request.app[INBOX]
    form = await request.post()
    signature = request.headers.get(SIGNATURE_HEADER, "")
    valid = bool(signature) and RequestValidator(inbox.auth_token).validate(inbox.signed_url(request), form, signature)
    let_through = mode == "skip_validation" or (mode == "accept_unsigned" and SIGNATURE_HEADER not in request.headers)
    if mode == "reject_all" or (not valid and not let_through):
        inbox.refused.append({"message_sid": form.get("MessageSid", ""), "signature_valid": valid})
        return web.Response(status=403, text="Forbidden")
    synthetic = request.headers.get("X-Synthetic-Canary") == "1"
    message = {
        "message_sid": str(form.get("MessageSid", "")),
        "from": str(form.get("From", "")),
        "to": str(form.get("To", "")),
        "body": str(form.get("Body", "")),
        "signature_valid": valid,
        "synthetic": synthetic,
    }
    inbox.messages.append(message)
    if mode == "bad_twiml":
        return web.Response(text="<Response><Message>Thanks, we got", content_type=_TWIML)
    twiml = MessagingResponse()
    if not synthetic:
        inbox.conversations[message["message_sid"]] = message
        twiml.message("Thanks for your message, an agent will reply shortly.")
    return web.Response(text=str(twiml), content_type=_TWIML)


async def _list_messages(request: web.Request) -> web.Response:
    inbox = request.app[INBOX]
    return web.json_response(
        {"messages": list(inbox.messages), "refused": list(inbox.refused), "conversations": list(inbox.conversations)}
    )
