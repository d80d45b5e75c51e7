"""`python -m pykern info` prints what this install is; `python -m pykern demo [--device D]`
runs every op against torch on the best device present."""

import argparse
import sys

from pykern.info import info


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pykern")
    parser.add_argument("command", choices=["info", "demo"], nargs="?", default="info")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    args = parser.parse_args()
    info()
    if args.command == "demo":
        from pykern import demo

        sys.exit(0 if demo.run(args.device) else 1)


if __name__ == "__main__":
    main()
