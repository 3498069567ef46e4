"""Fixtures of the engine tests alone (the tiny training set `tiny_data` and its config
`tiny_cfg` are tests/conftest.py's: the top-level CLI tests use them too)."""

import json
from pathlib import Path

import pytest


def _jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _train_steps(path):
    return [r for r in _jsonl(path) if "lr" in r]


@pytest.fixture
def jsonl():
    """`jsonl(path)`: the records of a log.jsonl."""
    return _jsonl


@pytest.fixture
def train_steps():
    """`train_steps(path)`: the records of a log.jsonl that a training step wrote (they carry
    its lr; evaluation and count-total records do not)."""
    return _train_steps
