"""Fixtures of the real-node tests: the node image (kernel + initramfs, built once per run) and
a lab factory whose labs are closed after the test, failed or not."""

from __future__ import annotations

import pytest

from node.lab import Lab, node_image as build_node_image


@pytest.fixture(scope="session")
def node_image():
    return build_node_image()


@pytest.fixture
def lab(node_image, tmp_path):
    """lab(names, servers=1) -> a Lab with one node slot (address) per name."""
    made: list[Lab] = []

    def make(names: list[str], servers: int = 1) -> Lab:
        made.append(Lab(tmp_path, node_image, names, servers))
        return made[-1]

    yield make
    for each in made:
        each.close()
