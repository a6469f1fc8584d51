"""Tests with a real node in them: Debian's kernel booted under qemu on a LAN of the test's own,
swapping to netswapd over NBD and NFS. kernel.py fetches the kernel, initramfs.py builds what
boots it, network.py makes the LAN, vm.py runs a node, lab.py puts them together with netswapd;
pages.py is the workload a node runs."""
