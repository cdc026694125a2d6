#!/usr/bin/env python3
"""Forward TCP connections on 127.0.0.1:PORT to a Unix socket, byte for byte.

HTTP tools that only speak TCP (schemathesis) reach consnap's control API
through it: scripts/fuzz-api.sh runs it as

    python3 scripts/uds-proxy.py PORT /path/to/api.sock

It listens on loopback only and stops on SIGTERM or SIGINT.
"""

import asyncio
import signal
import sys


async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main(port, path):
    async def handle(tcp_reader, tcp_writer):
        try:
            uds_reader, uds_writer = await asyncio.open_unix_connection(path)
        except OSError as e:
            print(f"uds-proxy: cannot connect to {path}: {e}", file=sys.stderr)
            tcp_writer.close()
            return
        await asyncio.gather(pipe(tcp_reader, uds_writer), pipe(uds_reader, tcp_writer))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: uds-proxy.py PORT UNIX_SOCKET")
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
