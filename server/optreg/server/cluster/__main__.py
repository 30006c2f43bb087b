"""`python -m optreg.server.cluster sessions|drain NODE|undrain NODE --data-dir DIR [--ray ADDRESS]`:
the cluster's operations (list every session with the host and node that own it; move a node's
sessions elsewhere)."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optreg.server.cluster")
    parser.add_argument("command", choices=["sessions", "drain", "undrain"])
    parser.add_argument("node", nargs="?", help="the node id (drain, undrain)")
    parser.add_argument("--data-dir", required=True, help="the storage the front ends use")
    parser.add_argument("--ray", default="auto", help="the Ray cluster's address (default: auto)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.command != "sessions" and not args.node:
        parser.error(f"{args.command} needs the node id (see `ray list nodes`)")
    from optreg.server.cluster.directory import Directory, connect
    connect(args.ray)
    directory = Directory(args.data_dir)
    if args.command == "sessions":
        rows = directory.sessions()
        if args.json:
            print(json.dumps(rows))
        for r in rows if not args.json else ():
            print(f"{r['session_id']}  epoch {r['epoch']}  step {r['step'] if r['step'] is not None else '-'}  "
                  f"{r['host']}  node {r['node']}{'' if r['loaded'] else '  (not loaded)'}")
    elif args.command == "drain":
        moved = directory.drain(args.node)
        print(json.dumps(moved) if args.json else f"{len(moved)} sessions moved off node {args.node}")
    else:
        directory.undrain(args.node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
