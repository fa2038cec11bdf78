"""The trainer program of a simulation started from Python (:func:`ferry_sdk.simulate`):
Ferry runs it in long-lived mode, and it hands every task line from Ferry to the calling
process's functions over a Unix socket, printing each answer line back to Ferry.
Run as ``python -m ferry_sdk.bridge SOCKET``."""

import socket
import sys


def main(path: str) -> None:
    """Relays task lines from stdin to the socket at ``path`` and its answers to stdout."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.connect(path)
        with connection.makefile("rw") as stream:
            for line in sys.stdin:
                stream.write(line if line.endswith("\n") else line + "\n")
                stream.flush()
                answer = stream.readline()
                if not answer:
                    sys.exit("the Python process running the simulation stopped answering")
                print(answer.rstrip("\n"), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
