#!/usr/bin/python3
"""One request through the node's endpoint, as an API client starting after
apilb would make it (scripts/test-systemd, lab-client.service).

Usage: lab-client.py LAB_DIR RESULT_FILE
LAB_DIR holds lab.json (the endpoint and the token) and ca.crt. Writes a
JSON object to RESULT_FILE; exits 0 when a test master answered /version.
"""
import json
import os
import socket
import ssl
import sys
import time

lab, out = sys.argv[1], sys.argv[2]
result = {"started_monotonic": time.monotonic()}
try:
    with open(os.path.join(lab, "lab.json")) as f:
        info = json.load(f)
    host, port = info["listen"].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=os.path.join(lab, "ca.crt"))
    request = (
        "GET /version HTTP/1.1\r\nHost: kubernetes\r\n"
        f"Authorization: Bearer {info['token']}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="kubernetes") as tls:
            tls.sendall(request)
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    server = json.loads(body).get("apilbServer") if status == 200 else None
    result.update(ok=bool(server), status=status, server=server)
except Exception as e:  # recorded, and the unit fails
    result.update(ok=False, error=f"{type(e).__name__}: {e}")
os.makedirs(os.path.dirname(out), exist_ok=True)
with open(out, "w") as f:
    json.dump(result, f)
print(json.dumps(result))
sys.exit(0 if result["ok"] else 1)
