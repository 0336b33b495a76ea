#!/usr/bin/env python3
"""A test double of Tedee's cloud API, written from tedee-cloud.md Part B, for lockbridge's
tests: the calls a gateway makes, each request checked as the real cloud documents it.

Usage: tedee_fake.py --state FILE [--tls CERT KEY]

Listens on 127.0.0.1, a free port, printed as `listening on PORT` once ready. FILE (JSON) is
the account: {"keys": {KEY: [SCOPE, ...]}, "locks": [{"id", "serialNumber", "name", "type",
"accessLevel", "devicePublicKey"}, ...], "authority_key": PEM_PATH, "validity_s": N,
"revoked": [LOCK_ID, ...], "wrong_device": [LOCK_ID, ...], "stale_once": [LOCK_ID, ...]}:
a revoked lock's certificate is refused (403), a wrong_device lock gets a certificate for
another device, a stale_once lock gets one already expired (its expirationDate says it is
not), once. It is read again on every request, so a test changes the account
(revokes a key or a lock's access, removes a scope, shortens certificates) by rewriting it.

Certificates are this project's format (ptls-spec.md §8), signed with `authority_key` — the
simulator world's authority — so that real sessions come up against `lockbridge sim`; signed
time is 8 bytes of Unix ms signed by the same key. Tedee's real certificates are opaque to the
gateway, which never parses them.

Every request is appended to FILE.requests (JSON lines: method, path, query, status, and any
"violations" of the documented rules: path under /api/v37/, `Authorization: PersonalKey`,
`Accept: application/json`, `Content-Type: application/json` on POST, a lockbridge
User-Agent). Faults queued in FILE.faults (a JSON list of {"path": substring, "device": ID
(optional: only that deviceId), "status": N, "body": "json"|"html"|"empty", "retry_after": S,
"delay_s": S (answer that late), "drop": true (close the connection without answering)}) are
served, first match first, once each. `"forget_mobiles": true` in FILE removes every
registered mobile (as the owner removing the hub in the Tedee app) and is then cleared.
"""

import base64
import datetime
import email.utils
import hashlib
import io
import json
import os
import ssl
import struct
import sys
import threading
import time
import uuid

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

VERSION = "v37"
SUPPORTED = "1.36, 37"
LOCK = threading.Lock()


class Account:
    def __init__(self, path):
        self.path = path
        self.mobiles = {}

    def load(self):
        with open(self.path, encoding="utf-8") as f:
            return json.load(f)

    def log(self, entry):
        with open(self.path + ".requests", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def take_fault(self, path, query):
        faults_path = self.path + ".faults"
        if not os.path.exists(faults_path):
            return None
        with open(faults_path, encoding="utf-8") as f:
            faults = json.load(f)
        for i, fault in enumerate(faults):
            device = fault.get("device")
            if fault["path"] in path and (device is None or str(device) == query.get("deviceid")):
                del faults[i]
                with open(faults_path, "w", encoding="utf-8") as f:
                    json.dump(faults, f)
                return fault
        return None


def scope_ok(scopes, *needed):
    return any(s in scopes for s in needed)


def tlv(tag, value):
    return bytes([tag, len(value)]) + value


def sign(key_path, data):
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def certificate(key_path, device_id, mobile_id, client_point, validity_s, stale=False):
    now_ms = int(time.time() * 1000)
    not_after = now_ms + int(validity_s * 1000)
    signed_until = now_ms - 60_000 if stale else not_after
    body = (tlv(0x01, b"\x01") + tlv(0x02, struct.pack(">I", device_id))
            + tlv(0x03, struct.pack(">Q", now_ms - 3_600_000))
            + tlv(0x04, struct.pack(">Q", signed_until))
            + tlv(0x05, struct.pack(">I", 7))
            + tlv(0x06, hashlib.sha256(mobile_id.encode()).digest()[:16])
            + tlv(0x7E, client_point))
    cert = body + tlv(0x7F, sign(key_path, body))
    expiry = datetime.datetime.fromtimestamp(not_after / 1000, datetime.timezone.utc)
    return cert, expiry.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    account = None

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.handle_call("GET")

    def do_POST(self):
        self.handle_call("POST")

    def do_DELETE(self):
        self.handle_call("DELETE")

    def answer(self, status, body=None, kind="json", headers=None):
        payload = b""
        if status != 204:
            if kind == "html":
                payload = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            elif kind == "empty":
                payload = b""
            else:
                payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("X-Correlation-ID", str(uuid.uuid4()))
        self.send_header("api-supported-versions", SUPPORTED)
        self.send_header("Date", email.utils.formatdate(usegmt=True))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if status != 204:
            self.send_header("Content-Type",
                             "text/html" if kind == "html" else "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)
        return status

    def envelope(self, status, result):
        return self.answer(status, {"result": result, "success": True, "errorMessages": [],
                                    "statusCode": status})

    def error(self, status, message):
        return self.answer(status, {"success": False, "errorMessages": [message],
                                    "statusCode": status})

    def handle_call(self, method):
        # The answer is composed first and sent only once the request is in the log, so a
        # client that has its answer finds its request there.
        real, self.wfile = self.wfile, io.BytesIO()
        with LOCK:
            delay = self.call(method)
        reply, self.wfile = self.wfile.getvalue(), real
        if delay:
            # A slow answer: the reply waits outside the lock, so other calls go on.
            time.sleep(delay)
        try:
            self.wfile.write(reply)
        except OSError:
            pass

    def call(self, method):
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        violations = []
        prefix = f"/api/{VERSION}/"
        if not url.path.startswith(prefix):
            violations.append(f"path {url.path} is not under {prefix}")
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("PersonalKey "):
            violations.append("no Authorization: PersonalKey")
        if self.headers.get("Accept") != "application/json":
            violations.append("no Accept: application/json")
        if method == "POST" and self.headers.get("Content-Type") != "application/json":
            violations.append("POST without Content-Type: application/json")
        if not self.headers.get("User-Agent", "").startswith("lockbridge/"):
            violations.append("no lockbridge User-Agent")
        resource = url.path[len(prefix):].lower()
        query = {k.lower(): v[0] for k, v in parse_qs(url.query).items()}
        entry = {"method": method, "path": resource, "query": query, "t": time.time()}
        if violations:
            entry["violations"] = violations
        self.delayed = None
        status = self.route(method, resource, query, auth[len("PersonalKey "):], raw, entry)
        entry["status"] = status
        self.account.log(entry)
        return self.delayed

    def route(self, method, resource, query, key, raw, entry):
        state = self.account.load()
        if state.pop("forget_mobiles", False):
            self.account.mobiles.clear()
            with open(self.account.path, "w", encoding="utf-8") as f:
                json.dump(state, f)
        fault = self.account.take_fault(resource, query)
        if fault and fault.get("drop"):
            self.close_connection = True
            self.connection.shutdown(2)
            return "dropped"
        if fault and "delay_s" in fault:
            # The real answer, sent late (after the caller's timeout).
            self.delayed = fault["delay_s"]
            entry["delay_s"] = fault["delay_s"]
            return self.route_ok(method, resource, query, key, raw, entry, state)
        if fault:
            headers = {}
            if "retry_after" in fault:
                headers["Retry-After"] = str(fault["retry_after"])
            status = fault["status"]
            if fault.get("body") == "json":
                return self.answer(status, {"success": False, "errorMessages": ["fault"],
                                            "statusCode": status}, headers=headers)
            return self.answer(status, kind=fault.get("body", "empty"), headers=headers)
        return self.route_ok(method, resource, query, key, raw, entry, state)

    def route_ok(self, method, resource, query, key, raw, entry, state):
        scopes = state.get("keys", {}).get(key)
        if scopes is None:
            return self.answer(401, kind="empty")
        if method == "GET" and resource == "my/lock":
            if not scope_ok(scopes, "Device.Read", "Device.ReadWrite"):
                return self.error(403, "Insufficient scope")
            locks = [dict(l, softwareVersions=[], deviceState=None) for l in state["locks"]]
            return self.envelope(200, locks)
        if method == "POST" and resource == "my/mobile":
            if not scope_ok(scopes, "Mobile.ReadWrite"):
                return self.error(403, "Insufficient scope")
            try:
                body = json.loads(raw)
                point = base64.b64decode(body["publicKey"], validate=True)
                ok = (isinstance(body.get("name"), str) and body["name"]
                      and body.get("operatingSystem") == 3 and len(point) == 65
                      and point[0] == 4)
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                entry.setdefault("violations", []).append("bad registration body")
                return self.error(400, "Invalid mobile registration")
            mobile_id = str(uuid.uuid4())
            self.account.mobiles[mobile_id] = {"name": body["name"],
                                               "publicKey": body["publicKey"]}
            entry["registered"] = {"id": mobile_id, "name": body["name"],
                                   "publicKey": body["publicKey"]}
            return self.envelope(201, {"id": mobile_id})
        if resource.startswith("my/mobile/"):
            mobile_id = resource[len("my/mobile/"):]
            if not scope_ok(scopes, "Mobile.ReadWrite", "Mobile.Read" if method == "GET" else ""):
                return self.error(403, "Insufficient scope")
            # Ids are matched as sent: the path was lower-cased, UUIDs are lower-case here.
            if mobile_id not in self.account.mobiles:
                return self.error(404, "mobile device not found")
            if method == "DELETE":
                del self.account.mobiles[mobile_id]
                return self.answer(204)
            m = self.account.mobiles[mobile_id]
            return self.envelope(200, {"id": mobile_id, "userIdentity": str(uuid.uuid4()),
                                       "name": m["name"], "operatingSystem": 3})
        if method == "GET" and resource == "my/devicecertificate/getformobile":
            if not scope_ok(scopes, "DeviceCertificate.Operate"):
                return self.error(403, "Insufficient scope")
            mobile_id = query.get("mobileid", "")
            try:
                device_id = int(query.get("deviceid", ""))
            except ValueError:
                return self.error(400, "deviceId is not a number")
            if mobile_id not in self.account.mobiles:
                return self.error(404, "mobile device not found")
            lock = next((l for l in state["locks"] if l["id"] == device_id), None)
            if lock is None or device_id in state.get("revoked", []):
                return self.error(403, "No access to the device")
            m = self.account.mobiles[mobile_id]
            point = base64.b64decode(m["publicKey"])
            stale = device_id in state.get("stale_once", [])
            if stale:
                state["stale_once"].remove(device_id)
                with open(self.account.path, "w", encoding="utf-8") as f:
                    json.dump(state, f)
            issued_for = device_id + 1 if device_id in state.get("wrong_device", []) else device_id
            cert, expiry = certificate(state["authority_key"], issued_for, mobile_id, point,
                                       state.get("validity_s", 10 * 86400), stale)
            return self.envelope(200, {
                # Line breaks, as the docs' sample has them: a client strips whitespace.
                "certificate": base64.encodebytes(cert).decode(),
                "expirationDate": expiry,
                "devicePublicKey": lock["devicePublicKey"],
                "mobilePublicKey": m["publicKey"],
            })
        if method == "GET" and resource == "datetime/getsignedtime":
            if not scope_ok(scopes, "Device.Read", "Device.ReadWrite"):
                return self.error(403, "Insufficient scope")
            datetime_bytes = struct.pack(">Q", int(time.time() * 1000))
            return self.envelope(200, {
                "datetime": base64.b64encode(datetime_bytes).decode(),
                "signature": base64.b64encode(sign(state["authority_key"], datetime_bytes)).decode(),
            })
        return self.error(404, f"no such resource {resource}")


def main():
    args = sys.argv[1:]
    state, tls = None, None
    while args:
        a = args.pop(0)
        if a == "--state":
            state = args.pop(0)
        elif a == "--tls":
            tls = (args.pop(0), args.pop(0))
        else:
            sys.exit(__doc__)
    if not state:
        sys.exit(__doc__)
    Handler.account = Account(state)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*tls)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
