"""`sknf bench` dispatches to one module per benchmark, each with its own options."""

from __future__ import annotations

import argparse

import pytest

from sknf import bench


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sknf bench")
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_cni_options() -> None:
    args = parse(["cni", "--pods", "5", "--parallel", "2"])
    assert (args.benchmark, args.pods, args.parallel, args.rounds) == ("cni", 5, 2, 3)


def test_every_listed_benchmark_has_a_parser() -> None:
    for name in bench.BENCHES:
        assert parse([name]).benchmark == name


def test_a_benchmark_is_required() -> None:
    with pytest.raises(SystemExit):
        parse([])
