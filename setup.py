"""netswap: an NBD swap server for diskless nodes, with a locked request-memory pool."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "daemon/netswap/__init__.py").read_text(), re.M
).group(1)

setup(
    name="netswap",
    version=VERSION,
    description="Swap space for diskless Linux nodes over NBD, served from a locked memory pool",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    package_dir={"": "daemon"},
    packages=find_packages("daemon"),
    # The pool, the send gate and the request loops are C (cext/): built by cffi in API mode
    # into netswap._pool.
    cffi_modules=["cext/build_pool.py:ffibuilder"],
    setup_requires=["cffi>=1.15"],
    install_requires=[
        "cffi>=1.15",
        # netpolicy.Shaper ([network] shape = true) builds its qdisc, classes and mark filter
        # over rtnetlink; imported only when shaping is on.
        "pyroute2>=0.9.1",
        # pressure.PressureMonitor: MemAvailable, with the kernel's own estimate where it has
        # one and psutil's reconstruction on kernels that predate it.
        "psutil>=5.9",
        # metrics.py: the Prometheus exposition format and its HTTP endpoint, read at scrape
        # time by a custom collector.
        "prometheus-client>=0.17",
    ],
    # atheris: the coverage-guided fuzz target of the NBD parsers (tests/fuzz), run briefly in CI.
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "atheris>=2.3"]},
    entry_points={"console_scripts": ["netswapd=netswap.cli:main", "netswapctl=netswap.ctl:main",
                                      "netswap-node=netswap.node.cli:main"]},
)
