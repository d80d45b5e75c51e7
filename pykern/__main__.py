"""`python -m pykern info` prints what this install is and can run."""

import argparse

from pykern.info import info


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pykern")
    parser.add_argument("command", choices=["info"], nargs="?", default="info")
    parser.parse_args()
    info()


if __name__ == "__main__":
    main()
