#!/usr/bin/env python3
"""Raw-socket clients for bench/reliability.sh: abusive ones (slowloris, stalled bodies,
clients that go away, a malformed and smuggling corpus, random mutation of valid
requests) and one that records every answer while the back end is killed. Standard
library only. Each subcommand prints `key=value` lines for the shell script to judge.

    reliability_clients.py slowloris HOST:PORT CONNS SECONDS
    reliability_clients.py stalled   HOST:PORT ADMIN_HOST:PORT body|gone|unread CONNS
    reliability_clients.py record    HOST:PORT SECONDS THREADS OUT.csv
    reliability_clients.py corpus    HOST:PORT BACKEND_HOST:PORT ADMIN_HOST:PORT
    reliability_clients.py fuzz      HOST:PORT SECONDS PARALLEL
    reliability_clients.py gauges    ADMIN_HOST:PORT
    reliability_clients.py counts    BACKEND_HOST:PORT ADMIN_HOST:PORT
"""

import json
import random
import re
import selectors
import socket
import sys
import threading
import time
import urllib.request


def addr(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def metrics(admin):
    """The gateway's /metrics as {name{labels}: value}."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


GAUGES = ("allot_class_in_flight", "allot_class_queue_length", "allot_gateway_running",
          "allot_backend_in_flight")


def gauge_sum(admin):
    """Requests held now, over every gauge that holds one, and the open connections."""
    m = metrics(admin)
    held = sum(v for k, v in m.items() if k.split("{")[0] in GAUGES)
    conns = sum(v for k, v in m.items() if k.split("{")[0] == "allot_gateway_connections")
    return held, conns


def backend_requests(backend):
    with urllib.request.urlopen(f"http://{backend}/__stats", timeout=5) as r:
        return json.loads(r.read())["requests"]


def forwarded(admin):
    """Requests the gateway says it sent to a back end."""
    return sum(v for k, v in metrics(admin).items()
               if k.split("{")[0] == "allot_backend_requests_total")


def exchange(target, data, timeout=8.0, pause_after=None):
    """Sends `data` (bytes, or a list of parts sent `pause_after` seconds apart), reads
    until the gateway closes or `timeout`; returns (bytes read, closed by the gateway)."""
    s = socket.create_connection(target, timeout=timeout)
    s.settimeout(timeout)
    got = b""
    closed = False
    try:
        parts = data if isinstance(data, list) else [data]
        for i, p in enumerate(parts):
            if i and pause_after:
                # Wait for an interim answer (100 Continue) before the next part.
                deadline = time.time() + pause_after
                while b"\r\n\r\n" not in got and time.time() < deadline:
                    s.settimeout(max(0.01, deadline - time.time()))
                    try:
                        chunk = s.recv(65536)
                    except socket.timeout:
                        break
                    if not chunk:
                        break
                    got += chunk
                s.settimeout(timeout)
            s.sendall(p)
        deadline = time.time() + timeout
        while time.time() < deadline:
            s.settimeout(max(0.01, deadline - time.time()))
            chunk = s.recv(65536)
            if not chunk:
                closed = True
                break
            got += chunk
    except (socket.timeout, TimeoutError):
        pass
    except OSError:
        closed = True  # reset: the gateway closed
    finally:
        s.close()
    return got, closed


def codes(data):
    """The status of every response in `data` (a body that does not end in CRLF runs
    into the next status line, so they are found anywhere)."""
    return [int(c) for c in re.findall(rb"HTTP/1\.[01] (\d{3}) ", data)]


# --- slowloris: CONNS connections each sending a head one header every second ---------

def slowloris(target, conns, seconds):
    sel = selectors.DefaultSelector()
    socks = []
    alive = set()
    t0 = time.time()
    # In batches, each connected and sent its first line before the next is opened (a
    # listen backlog is shorter than 5 000: past it SYNs are dropped and retried 1 s on).
    while len(alive) < conns and time.time() - t0 < seconds / 2:
        batch = []
        for _ in range(min(100, conns - len(alive))):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(target)
            socks.append(s)
            batch.append(s)
            sel.register(s, selectors.EVENT_WRITE)
        deadline = time.time() + 3
        pending = set(batch)
        while pending and time.time() < deadline:
            for key, _ in sel.select(timeout=0.1):
                s = key.fileobj
                sel.unregister(s)
                pending.discard(s)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    try:
                        s.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
                        alive.add(s)
                    except OSError:
                        pass
        for s in pending:
            sel.unregister(s)
    print(f"slowloris_connected={len(alive)} in {time.time() - t0:.1f}s", flush=True)
    answers = {}
    for s in alive:
        sel.register(s, selectors.EVENT_READ)
    end = t0 + seconds
    next_tick = time.time() + 1
    while time.time() < end and len(answers) < len(alive):
        for key, _ in sel.select(timeout=0.2):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            answers[s] = data
            sel.unregister(s)
        if time.time() >= next_tick:
            next_tick += 1
            for s in alive:
                if s not in answers:
                    try:
                        s.send(b"X-a: b\r\n")
                    except OSError:
                        pass
    got408 = sum(1 for d in answers.values() if d.startswith(b"HTTP/1.1 408"))
    print(f"slowloris_answered={len(answers)}")
    print(f"slowloris_408={got408}")
    print(f"slowloris_seconds={time.time() - t0:.1f}")
    for s in socks:
        s.close()


# --- stalled bodies and clients that go away -------------------------------------------

STALLS = {
    # An upload that stops after 10 of its 1000 bytes.
    "body": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789",
    # A request to a slow path whose client goes away while it waits.
    "gone": b"GET /sleep/3000 HTTP/1.1\r\nHost: x\r\n\r\n",
    # A large response its client never reads.
    "unread": b"GET /bytes/50000000 HTTP/1.1\r\nHost: x\r\n\r\n",
}


def stalled(target, admin, kind, conns):
    """CONNS clients of one kind of STALLS, held open and unread (the `gone` ones closed
    at once); reports how long until every gauge is back to 0 and every connection is
    closed."""
    socks = []
    for _ in range(conns):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(target)
        s.sendall(STALLS[kind])
        socks.append(s)
    time.sleep(0.3)
    held_peak, _ = gauge_sum(admin)
    t0 = time.time()
    if kind == "gone":
        for s in socks:
            s.close()
    held, conns_open = gauge_sum(admin)
    while held > 0 and time.time() - t0 < 15:
        time.sleep(0.05)
        held, conns_open = gauge_sum(admin)
    print(f"stalled_peak_held={held_peak:.0f}")
    print(f"stalled_held_at_end={held:.0f}")
    print(f"stalled_seconds_to_zero={time.time() - t0:.1f}")
    # The connections: closed by the gateway (timeouts) whatever the client does.
    while conns_open > 0 and time.time() - t0 < 15:
        time.sleep(0.05)
        _, conns_open = gauge_sum(admin)
    print(f"stalled_connections_at_end={conns_open:.0f}")
    print(f"stalled_seconds_to_no_connection={time.time() - t0:.1f}")
    for s in socks:
        s.close()


# --- record: answers, one line each, while the back end is killed and restarted --------

def record(target, seconds, threads, out):
    rows = []
    lock = threading.Lock()
    end = time.time() + seconds

    def worker():
        while time.time() < end:
            t = time.time()
            try:
                s = socket.create_connection(target, timeout=10)
                s.settimeout(10)
                s.sendall(b"GET /r HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while True:
                    c = s.recv(65536)
                    if not c:
                        break
                    data += c
                s.close()
                c = codes(data)
                status = c[0] if c else 0
            except OSError:
                status = -1
            with lock:
                rows.append((t, time.time() - t, status))
            if status != 200:
                time.sleep(0.01)

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    with open(out, "w") as f:
        for t, d, s in sorted(rows):
            f.write(f"{t:.3f},{d:.3f},{s}\n")


# --- corpus: each case, its expected status and how many requests the back end gets ---

def corpus_cases():
    big_uri = "/" + "u" * 100_000
    many = "".join(f"X-H{i}: v\r\n" for i in range(10_000))
    return [
        # name, bytes (or parts), expected statuses (a list: each response in order; a
        # set: one response, any of them), back-end requests (None: as forwarded)
        ("valid", b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n", [200], 1),
        # Both framings: read as chunked, answered, and the connection closed (RFC 9112
        # §6.1), so what follows the chunked body is never read as a second request.
        ("CL+TE, a request behind", b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", [200], 1),
        ("TE+CL", b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n", [200], 1),
        ("duplicate CL, differing", b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde", [400], 0),
        ("duplicate TE chunked", b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", [400], 0),
        ("TE not chunked", b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", {400, 501}, 0),
        ("obs-fold", b"GET /fold HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", [400], 0),
        ("space before colon", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", [400], 0),
        ("bare LF", b"GET /lf HTTP/1.1\nHost: x\n\n", [200], 1),
        ("NUL in a header", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", [400], 0),
        ("NUL in the target", b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n", [400], 0),
        ("huge chunk size", b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFFFF\r\nabc", {400, 413}, None),
        # The body limit counts bytes received, not chunk sizes declared: forwarded, then
        # cut off by the body timeout.
        ("chunk size past the body limit", b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFF\r\nabc", [200], 1),
        ("body past the body limit", b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\nabc", [413], 0),
        ("bad chunk size", b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", [400], None),
        ("absolute URI", b"GET http://x/abs HTTP/1.1\r\nHost: x\r\n\r\n", [200], 1),
        ("absolute URI without Host", b"GET http://x/abs HTTP/1.1\r\n\r\n", [400], 0),
        ("authority form", b"GET x:80 HTTP/1.1\r\nHost: x\r\n\r\n", [400], 0),
        ("CONNECT", b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", [501], 0),
        ("missing Host", b"GET / HTTP/1.1\r\n\r\n", [400], 0),
        ("duplicate Host", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", [400], 0),
        ("HTTP/1.0 without Host", b"GET /old HTTP/1.0\r\n\r\n", [200], 1),
        ("Connection: host", b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: host\r\n\r\n", [200], 1),
        ("pipelined three", b"GET /p1 HTTP/1.1\r\nHost: x\r\n\r\nGET /p2 HTTP/1.1\r\nHost: x\r\n\r\nGET /p3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [200, 200, 200], 3),
        ("100-continue", [b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n", b"hello"], [100, 200], 1),
        ("100 KB URI", f"GET {big_uri} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), [414], 0),
        ("10 000 headers", f"GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode(), [431], 0),
        ("bad version", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", {400, 505}, 0),
        ("not HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", [400], 0),
    ]


def corpus(target, backend, admin):
    failed = 0
    for name, data, want, backend_want in corpus_cases():
        before = backend_requests(backend)
        fwd_before = forwarded(admin)
        got, _ = exchange(target, data, timeout=5, pause_after=2 if isinstance(data, list) else None)
        time.sleep(0.05)
        seen = backend_requests(backend) - before
        fwd = forwarded(admin) - fwd_before
        got_codes = codes(got)
        if isinstance(want, set):
            ok_status = len(got_codes) == 1 and got_codes[0] in want
            want = sorted(want)
        else:
            ok_status = got_codes == want
        # The back end sees exactly what the gateway forwarded, and as many requests as
        # the case should pass (None: the gateway may forward before the body breaks).
        ok_backend = seen == fwd and (backend_want is None or seen == backend_want)
        verdict = "PASS" if ok_status and ok_backend else "FAIL"
        failed += verdict == "FAIL"
        print(f"corpus | {name} | {got_codes} | {want} | back end {seen} (forwarded {fwd:.0f}, "
              f"expected {backend_want if backend_want is not None else 'as forwarded'}) | {verdict}")
    print(f"corpus_failed={failed}")


# --- fuzz: random mutations of valid requests ------------------------------------------

TEMPLATES = [
    b"GET /f/a?b=c HTTP/1.1\r\nHost: x\r\nUser-Agent: fuzz\r\nAccept: */*\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\nhello world",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    b"GET /k1 HTTP/1.1\r\nHost: x\r\n\r\nGET /k2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET http://x/abs HTTP/1.1\r\nHost: x\r\nX-Plan: gold\r\n\r\n",
    b"PUT /f HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /old HTTP/1.0\r\n\r\n",
]
SPECIAL = [b"\r\n", b"\n", b"\r", b"\x00", b" ", b"\t", b":", b"chunked", b"Content-Length: 7\r\n",
           b"Transfer-Encoding: chunked\r\n", b"Host: y\r\n", b"0\r\n\r\n", b"ffffffffffff", b"-1",
           b"\xff", b"%00", b"HTTP/1.1", b"\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]


def mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(6)
        i = rng.randrange(len(data) + 1)
        if op == 0 and data:  # flip a byte
            data[min(i, len(data) - 1)] = rng.randrange(256)
        elif op == 1:  # insert a special token
            data[i:i] = rng.choice(SPECIAL)
        elif op == 2 and data:  # delete a run
            del data[i:i + rng.randint(1, 8)]
        elif op == 3:  # duplicate a line
            lines = bytes(data).split(b"\r\n")
            j = rng.randrange(len(lines))
            lines.insert(j, lines[j])
            data = bytearray(b"\r\n".join(lines))
        elif op == 4:  # a long run
            data[i:i] = bytes([rng.choice(b"a /:\r\n0")]) * rng.choice([10, 1000, 20000])
        else:  # truncate
            del data[i:]
    return bytes(data)


def fuzz(target, seconds, parallel):
    end = time.time() + seconds
    lock = threading.Lock()
    stats = {"cases": 0, "hangs": 0, "refused_connect": 0}
    by_status = {}
    hang_examples = []

    def worker(seed):
        rng = random.Random(seed)
        while time.time() < end:
            data = mutate(rng, rng.choice(TEMPLATES))
            try:
                # Every timeout the gateway applies (head, body, idle) is at most 2 s in
                # the script's configuration: no close within 8 s is a hang.
                got, closed = exchange(target, data, timeout=8)
            except OSError:
                with lock:
                    stats["refused_connect"] += 1
                continue
            with lock:
                stats["cases"] += 1
                if not closed:
                    stats["hangs"] += 1
                    if len(hang_examples) < 3:
                        hang_examples.append(data[:200])
                for c in codes(got) or [0]:
                    by_status[c] = by_status.get(c, 0) + 1

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(parallel)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(f"fuzz_cases={stats['cases']}")
    print(f"fuzz_hangs={stats['hangs']}")
    print(f"fuzz_connect_failures={stats['refused_connect']}")
    print("fuzz_statuses=" + " ".join(f"{k}:{v}" for k, v in sorted(by_status.items())))
    for ex in hang_examples:
        print(f"fuzz_hang_example={ex!r}")


def main():
    cmd = sys.argv[1]
    if cmd == "slowloris":
        slowloris(addr(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    elif cmd == "stalled":
        stalled(addr(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif cmd == "record":
        record(addr(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif cmd == "corpus":
        corpus(addr(sys.argv[2]), sys.argv[3], sys.argv[4])
    elif cmd == "fuzz":
        fuzz(addr(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "counts":
        print(f"{backend_requests(sys.argv[2])} {forwarded(sys.argv[3]):.0f}")
    elif cmd == "gauges":
        held, conns = gauge_sum(sys.argv[2])
        print(f"{held:.0f} {conns:.0f}")
    else:
        sys.exit(f"unknown subcommand {cmd}")


if __name__ == "__main__":
    main()
